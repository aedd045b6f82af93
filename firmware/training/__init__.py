"""Sparse on-device training of the int8 graph ("On-Device Training Under 256KB Memory").

    scheme         the versioned sparse-update scheme (what a device trains; ships in the manifest)
    positions      weighted layers indexed from the end of the network (block, conv role)
    memory         the training memory model: one step's named buffers, per layer, peak
    engine/        the numpy training engine: arena, fp32 backward kernels, QAS + SGD trainer
    analysis/      contribution analysis and the scheme planner (the paper's Eq. 5)
    model_version  a fine-tuned int8 model: the changed weights plus the sha256 of its base

It stands on plan and int8 (and the ground floor) only; `firmware.personalize` ties it to the
model families of `nas`.
"""
