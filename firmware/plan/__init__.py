"""Memory accounting and patch schedules (MCUNetV2): layer- and patch-based peaks, the arena
layout, the kernels' scratch, the SRAM account a device needs (`firmware.plan.account`), the
per-patch tiles and a float executor that runs them.
"""
