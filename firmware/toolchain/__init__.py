"""Cross-compilation (arm-none-eabi-gcc, per-device linker scripts) and QEMU runs: the only
modules of `firmware` that write files or run processes.
"""
