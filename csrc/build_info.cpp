// What this library was built against, readable WITHOUT loading it.
//
// fusedrnn/_ops.py finds this string in the bytes of the _C*.so file before it imports it, and
// refuses to load a library built against another torch: loading runs the static initialisers
// that register the ops with torch's C++ classes, whose layout may differ between torch releases,
// so a mismatched library could crash the process instead of raising. setup.py passes the values.
#ifndef FUSEDRNN_TORCH_VERSION
#define FUSEDRNN_TORCH_VERSION "unknown"
#endif
#ifndef FUSEDRNN_TORCH_CUDA_VERSION
#define FUSEDRNN_TORCH_CUDA_VERSION "none"
#endif
#ifdef FUSEDRNN_WITH_CUDA
#define FUSEDRNN_BUILD_KERNELS "cpu+cuda"
#else
#define FUSEDRNN_BUILD_KERNELS "cpu"
#endif

// `used` keeps the otherwise unreferenced string in the binary; the format is parsed by
// fusedrnn._ops._read_build_info: "key=value" fields separated by ';' between fixed delimiters.
extern "C" __attribute__((used, visibility("default"))) const char fusedrnn_build_info[] =
    "fusedrnn-build-info:torch=" FUSEDRNN_TORCH_VERSION ";torch_cuda=" FUSEDRNN_TORCH_CUDA_VERSION
    ";kernels=" FUSEDRNN_BUILD_KERNELS ":end";
