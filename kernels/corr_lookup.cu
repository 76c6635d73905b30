// One level of VideoFlow's correlation lookup (MOFNetStack/corr.py, CorrBlock): around each
// source pixel's target position (coords / 2^level) a (2r+1)^2 window of the level's volume,
// sampled bilinearly (align_corners=True, zeros outside). corr [B*h1*w1, hl, wl] (one plane per
// source pixel), coords [B, 2, h1, w1] as (x, y), out [B, channels, h1, w1], written at
// channels channel0 + a*(2r+1) + b, where window axis a offsets x and b offsets y
// (models/videoflow/corr.rs, CorrBlock::lookup). One thread per (source pixel, window tap).

extern "C" __global__ void corr_lookup_f32(const float* __restrict__ corr,
                                           const float* __restrict__ coords,
                                           float* __restrict__ out, int batch, int h1, int w1,
                                           int hl, int wl, int radius, float scale,
                                           int channel0, int channels) {
    int win = 2 * radius + 1;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long pixels = (long long)h1 * w1;
    if (i >= (long long)batch * pixels * win * win) return;
    long long p = i / (win * win);
    int q = (int)(i % (win * win));
    int a = q / win - radius, bw = q % win - radius;
    long long b = p / pixels, pix = p % pixels;
    float x = coords[(b * 2) * pixels + pix] / scale + (float)a;
    float y = coords[(b * 2 + 1) * pixels + pix] / scale + (float)bw;
    const float* plane = corr + p * hl * wl;
    float sum = 0.0f;
    if (isfinite(x) && isfinite(y)) {
        float x0 = floorf(x), y0 = floorf(y);
        float fx = x - x0, fy = y - y0;
        float tx[4] = {x0, x0 + 1.0f, x0, x0 + 1.0f};
        float ty[4] = {y0, y0, y0 + 1.0f, y0 + 1.0f};
        float wt[4] = {(1.0f - fx) * (1.0f - fy), fx * (1.0f - fy), (1.0f - fx) * fy, fx * fy};
        for (int t = 0; t < 4; ++t) {
            if (tx[t] < 0.0f || ty[t] < 0.0f || tx[t] > (float)(wl - 1) ||
                ty[t] > (float)(hl - 1))
                continue;
            sum += wt[t] * plane[(long long)ty[t] * wl + (long long)tx[t]];
        }
    }
    out[(b * channels + channel0 + q) * pixels + pix] = sum;
}
