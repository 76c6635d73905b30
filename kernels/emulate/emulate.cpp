// The launch indices of the CPU emulation (see emulate.h), set by the Rust side before it calls
// a kernel for one (block, thread).
#include "emulate.h"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

extern "C" void streamrecon_emu_index(unsigned block, unsigned thread, unsigned block_dim,
                                      unsigned grid_dim) {
    blockIdx = dim3{block, 0, 0};
    threadIdx = dim3{thread, 0, 0};
    blockDim = dim3{block_dim, 1, 1};
    gridDim = dim3{grid_dim, 1, 1};
}
