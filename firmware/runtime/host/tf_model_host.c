/*
 * The host entry points of a generated model built as a shared library
 * (firmware.toolchain.build.build_host_model): what the device agent's host backend calls
 * through ctypes. The model itself is the same model.c the firmware runs.
 */
#include <stdint.h>
#include <string.h>

#include "model.h"

static int32_t read_whole(void *ctx, uint32_t offset, int8_t *dst, uint32_t count)
{
    if (offset + count > TF_MODEL_INPUT_BYTES) {
        return -1;
    }
    memcpy(dst, (const int8_t *)ctx + offset, count);
    return 0;
}

/* One inference: `input` is TF_MODEL_INPUT_BYTES of HWC int8, `output` receives
 * TF_MODEL_OUTPUT_BYTES. Returns the tf_status. */
int32_t tf_host_run(const int8_t *input, int8_t *output)
{
    return (int32_t)tf_model_run(read_whole, (void *)input, output);
}

/* The byte counts the library was built for: input, output, overlay body (0: none). */
void tf_host_sizes(uint32_t *sizes)
{
    sizes[0] = TF_MODEL_INPUT_BYTES;
    sizes[1] = TF_MODEL_OUTPUT_BYTES;
#if defined(TF_HAS_OVERLAY)
    sizes[2] = TF_OVERLAY_BODY_BYTES;
#else
    sizes[2] = 0u;
#endif
}

/* Applies a weights overlay (NULL: the built-in weights); TF_OK, or why it was refused. */
int32_t tf_host_use_overlay(const uint8_t *overlay, uint32_t nbytes)
{
#if defined(TF_HAS_OVERLAY)
    return (int32_t)tf_model_use_overlay(overlay, nbytes);
#else
    (void)nbytes; /* no overlay region: only "the built-in weights" is accepted */
    return overlay == NULL ? (int32_t)TF_OK : (int32_t)TF_ERR_ARG;
#endif
}
