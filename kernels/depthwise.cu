// Depthwise nn.Conv2d(C, C, k, padding=k/2, groups=C) for odd k (VideoFlow's 15x15 PCBlock
// kernels): x [N, C, H, W], weight [C, 1, k, k], bias [C] (zeros for none), out [N, C, H, W].
// With residual_gelu != 0 the output is gelu_erf(x + conv(x)), one PCBlock step in one pass
// (models/ops.rs, depthwise_residual_gelu). One thread per output value.

__device__ __forceinline__ float gelu_erf(float v) {
    return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
}

extern "C" __global__ void depthwise_conv2d_f32(const float* __restrict__ x,
                                                const float* __restrict__ weight,
                                                const float* __restrict__ bias,
                                                float* __restrict__ out, int n, int c, int h,
                                                int w, int k, int residual_gelu) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long plane_len = (long long)h * w;
    if (i >= (long long)n * c * plane_len) return;
    long long plane = i / plane_len;
    int ch = (int)(plane % c);
    int y = (int)((i % plane_len) / w), xx = (int)(i % w);
    int pad = k / 2;
    const float* src = x + plane * plane_len;
    const float* taps = weight + (long long)ch * k * k;
    float sum = 0.0f;
    for (int ky = 0; ky < k; ++ky) {
        int sy = y + ky - pad;
        if (sy < 0 || sy >= h) continue;
        for (int kx = 0; kx < k; ++kx) {
            int sx = xx + kx - pad;
            if (sx < 0 || sx >= w) continue;
            sum += taps[ky * k + kx] * src[(long long)sy * w + sx];
        }
    }
    sum += bias[ch];
    out[i] = residual_gelu ? gelu_erf(x[i] + sum) : sum;
}
