"""The pure core of tinyfleet, laid out as its pipeline (README: "Layout of firmware/").

ground floor (ir, errors, arch, targets, data, float_exec, image) <- frontend, plan, int8
<- nas, codegen, toolchain <- pipeline; training uses plan and int8. Nothing here imports an
I/O framework or reads the environment; only `toolchain` writes files or runs processes.
"""
