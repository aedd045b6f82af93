/* Patch-based inference helpers: cut a padded patch out of a tensor, paste one back. */
#include "tf_internal.h"

tf_status tf_patch_load_s8(const tf_dims *src_dims, const int8_t *src, int32_t row0,
                           int32_t col0, const tf_dims *dst_dims, int8_t *dst,
                           int8_t pad_value)
{
    tf_status st;
    if (src == NULL || dst == NULL) {
        return TF_ERR_NULL;
    }
    if ((st = tf_check_dims(src_dims)) != TF_OK || (st = tf_check_dims(dst_dims)) != TF_OK) {
        return st;
    }
    if (src_dims->c != dst_dims->c) {
        return TF_ERR_SHAPE;
    }
    const size_t c = (size_t)src_dims->c;
    for (int32_t r = 0; r < dst_dims->h; r++) {
        const int32_t y = row0 + r;
        int8_t *drow = dst + (size_t)r * (size_t)dst_dims->w * c;
        if (y < 0 || y >= src_dims->h) {
            memset(drow, pad_value, (size_t)dst_dims->w * c);
            continue;
        }
        /* Split the row into left border, inside, right border. */
        const int32_t a = col0 < 0 ? -col0 : 0;
        int32_t b = src_dims->w - col0;
        b = b > dst_dims->w ? dst_dims->w : (b < a ? a : b);
        memset(drow, pad_value, (size_t)a * c);
        memcpy(drow + (size_t)a * c,
               src + ((size_t)y * (size_t)src_dims->w + (size_t)(col0 + a)) * c,
               (size_t)(b - a) * c);
        memset(drow + (size_t)b * c, pad_value, (size_t)(dst_dims->w - b) * c);
    }
    return TF_OK;
}

tf_status tf_patch_store_s8(const tf_dims *src_dims, const int8_t *src,
                            const tf_dims *dst_dims, int8_t *dst, int32_t row0, int32_t col0)
{
    tf_status st;
    if (src == NULL || dst == NULL) {
        return TF_ERR_NULL;
    }
    if ((st = tf_check_dims(src_dims)) != TF_OK || (st = tf_check_dims(dst_dims)) != TF_OK) {
        return st;
    }
    if (src_dims->c != dst_dims->c || row0 < 0 || col0 < 0 ||
        row0 + src_dims->h > dst_dims->h || col0 + src_dims->w > dst_dims->w) {
        return TF_ERR_SHAPE;
    }
    const size_t row_bytes = (size_t)src_dims->w * (size_t)src_dims->c;
    for (int32_t r = 0; r < src_dims->h; r++) {
        memcpy(dst + ((size_t)(row0 + r) * (size_t)dst_dims->w + (size_t)col0) *
                         (size_t)dst_dims->c,
               src + (size_t)r * row_bytes, row_bytes);
    }
    return TF_OK;
}
