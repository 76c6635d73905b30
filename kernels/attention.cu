// softmax(q.k^T * scale).v over a K/V cache without the score matrix: at InfiniteVGGT's default
// 1.2 M-token budget, VGGT-1B's scores for one frame's queries would take 16 heads x ~1,000
// queries x 1.2 M keys x 4 bytes = 80 GB, which is what composing candle's matmul and softmax
// would allocate. One thread per (head, query) runs an online softmax over the m valid cache
// rows (running maximum, rescaled sum and accumulator), so memory is the output only.
// q [heads, n, d], k and v [heads, cap, d] (rows 0..m valid), out [heads, n, d]; d <= 256.
// Not tiled through shared memory yet (the CPU emulation runs threads one by one): correct
// and memory-bounded first (models/attention.rs, sdpa, is its CPU twin).

#define ATTENTION_MAX_D 256

extern "C" __global__ void attention_f32(const float* __restrict__ q,
                                         const float* __restrict__ k,
                                         const float* __restrict__ v, float* __restrict__ out,
                                         int heads, int n, int m, int cap, int d, float scale) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)heads * n) return;
    long long h = i / n;
    const float* qi = q + i * d;
    const float* kh = k + h * cap * d;
    const float* vh = v + h * cap * d;
    float acc[ATTENTION_MAX_D];
    for (int c = 0; c < d; ++c) acc[c] = 0.0f;
    // -FLT_MAX, not -INFINITY: NVRTC has no math.h; the first key's shrink is then exp(-huge) = 0.
    float running_max = -3.402823466e38f, sum = 0.0f;
    for (long long j = 0; j < m; ++j) {
        const float* kj = kh + j * d;
        float s = 0.0f;
        for (int c = 0; c < d; ++c) s += qi[c] * kj[c];
        s *= scale;
        if (s > running_max) {
            float shrink = expf(running_max - s);
            sum *= shrink;
            for (int c = 0; c < d; ++c) acc[c] *= shrink;
            running_max = s;
        }
        float p = expf(s - running_max);
        sum += p;
        const float* vj = vh + j * d;
        for (int c = 0; c < d; ++c) acc[c] += p * vj[c];
    }
    float* o = out + i * d;
    for (int c = 0; c < d; ++c) o[c] = acc[c] / sum;
}
