/*
 * Reset handler and vector table for Cortex-M (newlib's rdimon start-up fails on the QEMU
 * mps2 boards). At reset: copy .data, zero .bss, paint .noinit (arena, scratch) and the free
 * RAM below the stack with 0xA5 so that tf_painted_high_water / tf_stack_high_water can
 * measure what a run touched. SysTick counts core clock ticks (instructions under -icount).
 */
#include <stdint.h>
#include <string.h>

#include "tinyfleet_platform.h"

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, __noinit_start, __noinit_end, _estack;
int main(void);

#define TF_PAINT 0xA5A5A5A5u
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)
#define SYST_RELOAD 0x00FFFFFFu

static volatile uint32_t tf_systick_wraps;

void Reset_Handler(void) __attribute__((noreturn));
void Default_Handler(void);
void HardFault_Handler(void);
void SysTick_Handler(void);

__attribute__((section(".isr_vector"), used)) static void (*const tf_vectors[16])(void) = {
    (void (*)(void))(&_estack), Reset_Handler, Default_Handler, HardFault_Handler,
    HardFault_Handler, HardFault_Handler, HardFault_Handler, 0, 0, 0, 0,
    Default_Handler, Default_Handler, 0, Default_Handler, SysTick_Handler};

/* Word loops, not memcpy/memset: this runs before anything is initialised. */
void Reset_Handler(void)
{
    uint32_t *src = &_sidata;
    for (uint32_t *dst = &_sdata; dst < &_edata;) {
        *dst++ = *src++;
    }
    for (uint32_t *dst = &_sbss; dst < &_ebss;) {
        *dst++ = 0;
    }
    uint32_t sp;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    /* Paint up to 64 bytes below the current frame; the rest of the stack is in use. */
    for (uint32_t *dst = &__noinit_start; (uint32_t)dst < sp - 64u;) {
        *dst++ = TF_PAINT;
    }
    SYST_RVR = SYST_RELOAD;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* processor clock, interrupt on wrap, enabled */
    /* The counter reads 0 until its first reload; wait for it so that ticks are monotonic. */
    while (SYST_CVR == 0u) {
    }
    tf_exit(main());
}

void SysTick_Handler(void)
{
    tf_systick_wraps++;
}

void Default_Handler(void)
{
    tf_exit(126);
}

void HardFault_Handler(void)
{
    tf_exit(127);
}

uint64_t tf_clock_ticks(void)
{
    uint32_t wraps, value;
    do {
        wraps = tf_systick_wraps;
        value = SYST_CVR;
    } while (wraps != tf_systick_wraps);
    return (uint64_t)wraps * (SYST_RELOAD + 1u) + (SYST_RELOAD - value);
}

uint32_t tf_stack_high_water(void)
{
    const uint32_t *p = &__noinit_end;
    while (p < &_estack && *p == TF_PAINT) {
        p++;
    }
    return (uint32_t)((const uint8_t *)&_estack - (const uint8_t *)p);
}
