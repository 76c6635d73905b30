// InfiniteVGGT's rolling-memory pruning on the device (models/vggt/memory.rs, LayerKv::evict):
// each head keeps its anchors and the `keep` candidates whose L2-normalised keys are least
// similar to the candidates' mean normalised key (lowered by the pose-adaptive priority), in
// their original order. The cache is [heads, cap, d]; candidates are rows anchor..anchor+cand.
// Five launches, each thread independent: norms, mean key, scores, ranks, then the kept rows
// copied into a second cache (moving rows within one cache in parallel would race).

// Row norms, floored as the CPU's: norms [heads, cand]. One thread per (head, candidate).
extern "C" __global__ void kv_key_norms_f32(const float* __restrict__ keys,
                                            float* __restrict__ norms, int heads, int cap,
                                            int anchor, int cand, int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)heads * cand) return;
    long long h = i / cand, r = i % cand;
    const float* row = keys + (h * cap + anchor + r) * d;
    float sum = 0.0f;
    for (int j = 0; j < d; ++j) sum += row[j] * row[j];
    norms[i] = fmaxf(sqrtf(sum), 1e-12f);
}

// The mean normalised key: mean [heads, d]. One thread per (head, component), summing the
// candidates in order (as the CPU does, so the same rounding).
extern "C" __global__ void kv_mean_key_f32(const float* __restrict__ keys,
                                           const float* __restrict__ norms,
                                           float* __restrict__ mean, int heads, int cap,
                                           int anchor, int cand, int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)heads * d) return;
    long long h = i / d, j = i % d;
    const float* col = keys + (h * cap + anchor) * d + j;
    float sum = 0.0f;
    for (int r = 0; r < cand; ++r) sum += col[(long long)r * d] / norms[h * cand + r];
    mean[i] = sum / (float)cand;
}

// scores [heads, cand] = normalised key . mean key - priority [heads, cand].
extern "C" __global__ void kv_scores_f32(const float* __restrict__ keys,
                                         const float* __restrict__ norms,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ priority,
                                         float* __restrict__ scores, int heads, int cap,
                                         int anchor, int cand, int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)heads * cand) return;
    long long h = i / cand, r = i % cand;
    const float* row = keys + (h * cap + anchor + r) * d;
    const float* m = mean + h * d;
    float norm = norms[i], sum = 0.0f;
    for (int j = 0; j < d; ++j) sum += (row[j] / norm) * m[j];
    scores[i] = sum - priority[i];
}

// Rust's f32::total_cmp order as a signed integer order.
__device__ __forceinline__ int total_order_key(float v) {
    int bits = __float_as_int(v);
    return bits ^ (int)(((unsigned)(bits >> 31)) >> 1);
}

// kept [heads, cand] = 1 where the candidate is among its head's `keep` lowest scores (ties to
// the earlier position, the CPU's order), else 0. One thread per (head, candidate), counting the
// candidates ahead of it: quadratic, but without a sort or any cross-thread step.
extern "C" __global__ void kv_rank_keep_f32(const float* __restrict__ scores,
                                            int* __restrict__ kept, int heads, int cand,
                                            int keep) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)heads * cand) return;
    long long h = i / cand, r = i % cand;
    const float* s = scores + h * cand;
    int mine = total_order_key(s[r]);
    int ahead = 0;
    for (long long o = 0; o < cand && ahead < keep; ++o) {
        int theirs = total_order_key(s[o]);
        ahead += (theirs < mine || (theirs == mine && o < r)) ? 1 : 0;
    }
    kept[i] = ahead < keep ? 1 : 0;
}

// slot [heads, cand]: each kept candidate's row after the anchors in the compacted cache, -1
// for the dropped. One thread per head (a running count along the head).
extern "C" __global__ void kv_keep_slots(const int* __restrict__ kept, int* __restrict__ slot,
                                         int heads, int cand) {
    long long h = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (h >= heads) return;
    int next = 0;
    for (long long r = 0; r < cand; ++r)
        slot[h * cand + r] = kept[h * cand + r] ? next++ : -1;
}

// dst [heads, cap, d] = the anchors, then each kept candidate at its slot. One thread per
// value of rows 0..anchor+cand.
extern "C" __global__ void kv_compact_f32(const float* __restrict__ src,
                                          const int* __restrict__ slot, float* __restrict__ dst,
                                          int heads, int cap, int anchor, int cand, int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long rows = (long long)anchor + cand;
    if (i >= (long long)heads * rows * d) return;
    long long h = i / (rows * d), row = (i / d) % rows, j = i % d;
    long long to = row;
    if (row >= anchor) {
        int s = slot[h * cand + (row - anchor)];
        if (s < 0) return;
        to = anchor + s;
    }
    dst[(h * cap + to) * d + j] = src[(h * cap + row) * d + j];
}
