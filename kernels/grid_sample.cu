// grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=True) with the
// grid in pixel coordinates (VideoFlow's bilinear_sampler): img [N, C, H, W], coords
// [N, Ho, Wo, 2] as (x, y), out [N, C, Ho, Wo]. One thread per output pixel, all channels; the
// taps are summed in the CPU version's order (models/ops.rs, grid_sample_pixels).

extern "C" __global__ void grid_sample_pixels_f32(const float* __restrict__ img,
                                                  const float* __restrict__ coords,
                                                  float* __restrict__ out, int n, int c, int h,
                                                  int w, int ho, int wo) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long pixels = (long long)ho * wo;
    if (i >= (long long)n * pixels) return;
    long long b = i / pixels, p = i % pixels;
    float x = coords[2 * i], y = coords[2 * i + 1];
    const float* plane = img + b * c * h * w;
    float* o = out + b * c * pixels + p;
    bool finite = isfinite(x) && isfinite(y);
    float x0 = finite ? floorf(x) : 0.0f, y0 = finite ? floorf(y) : 0.0f;
    float fx = x - x0, fy = y - y0;
    float tx[4] = {x0, x0 + 1.0f, x0, x0 + 1.0f};
    float ty[4] = {y0, y0, y0 + 1.0f, y0 + 1.0f};
    float wt[4] = {(1.0f - fx) * (1.0f - fy), fx * (1.0f - fy), (1.0f - fx) * fy, fx * fy};
    long long at[4];
    for (int t = 0; t < 4; ++t) {
        bool inside = finite && tx[t] >= 0.0f && ty[t] >= 0.0f && tx[t] <= (float)(w - 1) &&
                      ty[t] <= (float)(h - 1);
        at[t] = inside ? (long long)ty[t] * w + (long long)tx[t] : -1;
    }
    for (int ch = 0; ch < c; ++ch) {
        const float* src = plane + (long long)ch * h * w;
        float sum = 0.0f;
        for (int t = 0; t < 4; ++t)
            if (at[t] >= 0) sum += wt[t] * src[at[t]];
        o[ch * pixels] = sum;
    }
}
