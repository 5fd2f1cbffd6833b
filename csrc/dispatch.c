/* Runtime CPU-feature detection: which compiled-in kernel tables this CPU (and OS) can run. */
#include "bitnet_cpu.h"

#if defined(BN_HAVE_AVX2) /* the build compiles the x86 kernels only for x86 targets */
#if defined(_MSC_VER)
#include <immintrin.h>
#include <intrin.h>
static void cpuid(int leaf, int sub, unsigned r[4]) {
    int v[4];
    __cpuidex(v, leaf, sub);
    for (int i = 0; i < 4; i++) r[i] = (unsigned)v[i];
}
static unsigned long long xgetbv0(void) { return _xgetbv(0); }
#else
#include <cpuid.h>
static void cpuid(int leaf, int sub, unsigned r[4]) {
    r[0] = r[1] = r[2] = r[3] = 0;
    __cpuid_count((unsigned)leaf, (unsigned)sub, r[0], r[1], r[2], r[3]);
}
static unsigned long long xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

static int x86_has(int isa) {
    unsigned r[4];
    cpuid(0, 0, r);
    unsigned max_leaf = r[0];
    cpuid(1, 0, r);
    int osxsave = (r[2] >> 27) & 1, fma = (r[2] >> 12) & 1;
    if (!osxsave || max_leaf < 7) return 0;
    unsigned long long xcr0 = xgetbv0();
    int ymm_os = (xcr0 & 0x6) == 0x6, zmm_os = (xcr0 & 0xe6) == 0xe6;
    cpuid(7, 0, r);
    int avx2 = (r[1] >> 5) & 1;
    int avx512f = (r[1] >> 16) & 1, avx512bw = (r[1] >> 30) & 1, avx512vl = (r[1] >> 31) & 1;
    int vnni = (r[2] >> 11) & 1;
    if (isa == BN_ISA_AVX2) return ymm_os && avx2 && fma;
    if (isa == BN_ISA_AVX512VNNI) return ymm_os && zmm_os && avx2 && fma && avx512f && avx512bw && avx512vl && vnni;
    return 0;
}
#endif

#if defined(BN_HAVE_NEONDOT)
#if defined(__APPLE__)
#include <sys/sysctl.h>
static int arm_has_dotprod(void) {
    int v = 0;
    size_t n = sizeof v;
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &n, NULL, 0) == 0 && v;
}
#elif defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
static int arm_has_dotprod(void) { return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0; }
#else
static int arm_has_dotprod(void) { return 0; }
#endif
#endif

static const bn_isa_ops *probe(int isa) {
    switch (isa) {
    case BN_ISA_SCALAR:
        return &bn_ops_scalar;
#ifdef BN_HAVE_AVX2
    case BN_ISA_AVX2:
        return x86_has(BN_ISA_AVX2) ? &bn_ops_avx2 : NULL;
#endif
#ifdef BN_HAVE_AVX512VNNI
    case BN_ISA_AVX512VNNI:
        return x86_has(BN_ISA_AVX512VNNI) ? &bn_ops_avx512vnni : NULL;
#endif
#ifdef BN_HAVE_NEONDOT
    case BN_ISA_NEONDOT:
        return arm_has_dotprod() ? &bn_ops_neondot : NULL;
#endif
    default:
        return NULL;
    }
}

/* Probed once: cpuid traps to the hypervisor in a VM and costs microseconds, more than a small GEMV. */
static const bn_isa_ops *table[BN_ISA_COUNT];
static int table_ready;

void bn_isa_init(void) {
    if (table_ready) return;
    for (int i = 0; i < BN_ISA_COUNT; i++) table[i] = probe(i);
    table_ready = 1;
}

const bn_isa_ops *bn_isa_get(int isa) {
    bn_isa_init();
    return isa >= 0 && isa < BN_ISA_COUNT ? table[isa] : NULL;
}

int bn_isa_best(void) {
    static const int order[] = {BN_ISA_AVX512VNNI, BN_ISA_AVX2, BN_ISA_NEONDOT};
    for (unsigned i = 0; i < sizeof order / sizeof order[0]; i++)
        if (bn_isa_get(order[i])) return order[i];
    return BN_ISA_SCALAR;
}
