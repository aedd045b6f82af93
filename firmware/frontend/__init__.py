"""Models in: the ONNX importer and the built-in networks, both giving an IR `Graph`.

Every op or attribute that cannot be represented exactly is refused with `UnsupportedOpError`.
"""
