// Marks functions shared by host and device code: plain inline on the host compiler,
// __host__ __device__ under nvcc, so one definition of each numeric rule serves every backend.
#pragma once
#if defined(__CUDACC__)
#define QK_HD __host__ __device__ __forceinline__
#else
#define QK_HD inline
#endif
