"""The pure core of tinyfleet: model IR, memory planner, patch scheduler, search, int8 compiler.

Nothing here imports an I/O framework (flask, celery, paho, sqlalchemy) or reads the
environment; only `build` and `emulator` write files or run processes.
"""
