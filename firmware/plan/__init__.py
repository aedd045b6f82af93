"""Memory accounting and patch schedules (MCUNetV2): layer- and patch-based peaks, the arena
plan, the per-patch tiles and a float executor that runs them.
"""
