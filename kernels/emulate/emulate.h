// The CUDA dialect the kernels use, as plain C++, so the same sources run on the CPU: each
// launch is a loop over (block, thread) that sets the indices below and calls the kernel. Only
// what the kernels need is defined; a kernel that reached for shared memory, __syncthreads or
// atomics would not compile here, which is the point: every thread of these kernels is
// independent, so running them one after another is exactly the launch's result.
#pragma once
#include <math.h>
#include <string.h>

struct dim3 {
    unsigned x, y, z;
};

extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__ static
#define __forceinline__ inline

static inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, sizeof i);
    return i;
}
