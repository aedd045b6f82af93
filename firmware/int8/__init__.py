"""int8 post-training quantization, the integer reference executor (the C kernels'
executable specification), fake quantization and the QDQ ONNX export.
"""
