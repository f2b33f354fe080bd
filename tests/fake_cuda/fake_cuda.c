/* A stand-in for the CUDA driver (libcuda.so.1) with the nine calls fastq's upload makes
 * (rust/core/cuda.rs), so the driver path runs on a machine without a GPU: "device" addresses are host
 * addresses, a copy is a memcpy, events and streams do nothing. tests/test_upload_driver.py builds it.
 *
 * fake_make_current() makes a context current on the calling thread, as torch does on its threads;
 * FAKE_CUDA_FAIL_COPY=N makes the N-th copy fail with CUDA_ERROR_ILLEGAL_ADDRESS (700). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
static _Thread_local void *current;
static void *const CONTEXT = (void *)0x1000;
static int copies, events_live;

void fake_make_current(void) { current = CONTEXT; }
int fake_copies(void) { return copies; }
int fake_events_live(void) { return events_live; }

CUresult cuCtxGetCurrent(void **ctx) { *ctx = current; return 0; }
CUresult cuCtxSetCurrent(void *ctx) { current = ctx; return ctx == CONTEXT || ctx == NULL ? 0 : 201; }

CUresult cuMemcpyHtoDAsync_v2(uint64_t dst, const void *src, size_t n, void *stream) {
    (void)stream;
    if (current != CONTEXT) return 201; /* CUDA_ERROR_INVALID_CONTEXT */
    copies++;
    const char *fail = getenv("FAKE_CUDA_FAIL_COPY");
    if (fail && atoi(fail) == copies) return 700; /* CUDA_ERROR_ILLEGAL_ADDRESS */
    memcpy((void *)(uintptr_t)dst, src, n);
    return 0;
}

CUresult cuEventCreate(void **ev, unsigned flags) { (void)flags; *ev = malloc(1); events_live++; return 0; }
CUresult cuEventRecord(void *ev, void *stream) { (void)ev; (void)stream; return current == CONTEXT ? 0 : 201; }
CUresult cuEventSynchronize(void *ev) { (void)ev; return 0; }
CUresult cuEventDestroy_v2(void *ev) { free(ev); events_live--; return 0; }
CUresult cuStreamSynchronize(void *stream) { (void)stream; return 0; }

CUresult cuGetErrorName(CUresult r, const char **name) {
    switch (r) {
    case 201: *name = "CUDA_ERROR_INVALID_CONTEXT"; return 0;
    case 700: *name = "CUDA_ERROR_ILLEGAL_ADDRESS"; return 0;
    default: *name = NULL; return 1; /* CUDA_ERROR_INVALID_VALUE */
    }
}
