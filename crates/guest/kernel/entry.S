/*
 * livemig workload guest: PVH entry, long-mode switch, AP trampoline, interrupt stubs.
 *
 * A PVH loader enters pvh_start in 32-bit protected mode, paging off, %ebx = hvm_start_info.
 * The first 4 GiB are identity mapped with 2 MiB pages from static tables; the C side maps
 * RAM above 4 GiB itself.
 */

#define SEL_CODE32 0x08
#define SEL_DATA   0x10
#define SEL_CODE64 0x18
#define TRAMPOLINE_BASE 0x10000

/* XEN_ELFNOTE_PHYS32_ENTRY (18): the note linux-loader, QEMU and Firecracker look for. */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start

    .section .text.boot, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi
    lgdt gdt_ptr
    mov $boot_stack_top, %esp
    call enter_long_mode_32
    ljmp $SEL_CODE64, $bsp_long_entry

/* Shared by the BSP and the APs: PAE + OSFXSR, page tables, EFER.LME, paging on. */
enter_long_mode_32:
    mov %cr4, %eax
    or $0x620, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    and $0x9FFFFFFF, %eax
    mov %eax, %cr0
    ret

    .code64
bsp_long_entry:
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    /* .bss is not part of the file image: the loader may leave anything there. */
    mov $__bss_start, %rdi
    mov $__bss_end, %rcx
    sub %rdi, %rcx
    shr $3, %rcx
    xor %eax, %eax
1:  test %rcx, %rcx
    jz 2f
    mov %rax, (%rdi)
    add $8, %rdi
    dec %rcx
    jmp 1b
2:  mov %esi, %edi
    call kmain
3:  cli
    hlt
    jmp 3b

ap_long_entry:
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov ap_boot_stack(%rip), %rsp
    call ap_main
4:  cli
    hlt
    jmp 4b

/*
 * AP trampoline, copied to TRAMPOLINE_BASE by the BSP before INIT-SIPI-SIPI
 * (SIPI vector TRAMPOLINE_BASE >> 12). Runs with CS = TRAMPOLINE_BASE >> 4, IP = 0.
 */
    .section .data.trampoline, "aw"
    .globl trampoline_start, trampoline_end
    .code16
trampoline_start:
    cli
    cld
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (trampoline_gdt_ptr - trampoline_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $SEL_CODE32, $(TRAMPOLINE_BASE + trampoline_32 - trampoline_start)
    .code32
trampoline_32:
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $(TRAMPOLINE_BASE + 0x1000), %esp
    mov $enter_long_mode_32, %eax
    call *%eax
    ljmp $SEL_CODE64, $ap_long_entry
    .balign 8
trampoline_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
trampoline_end:

/* Interrupt and exception entry points. */
    .text
    .code64
    .globl lapic_timer_isr, spurious_isr
lapic_timer_isr:
    push %rax
    mov $0xFEE000B0, %eax
    movl $0, (%rax)
    pop %rax
    iretq
spurious_isr:
    iretq

/* Device interrupts (MSI-X): vector DEVICE_VECTOR_BASE + n sets bit n of irq_pending; the
 * vCPU that serves the devices wakes from hlt and looks at their queues. */
.macro DEVICE_ISR n
device_isr_\n:
    lock orl $(1 << \n), irq_pending(%rip)
    push %rax
    mov $0xFEE000B0, %eax
    movl $0, (%rax)
    pop %rax
    iretq
.endm
    DEVICE_ISR 0
    DEVICE_ISR 1
    DEVICE_ISR 2
    DEVICE_ISR 3
    DEVICE_ISR 4
    DEVICE_ISR 5
    DEVICE_ISR 6
    DEVICE_ISR 7

.macro EXC_NOERR n
    .globl exc_\n
exc_\n:
    pushq $0
    pushq $\n
    jmp exception_common
.endm
.macro EXC_ERR n
    .globl exc_\n
exc_\n:
    pushq $\n
    jmp exception_common
.endm
EXC_NOERR 0
EXC_NOERR 1
EXC_NOERR 2
EXC_NOERR 3
EXC_NOERR 4
EXC_NOERR 5
EXC_NOERR 6
EXC_NOERR 7
EXC_ERR 8
EXC_NOERR 9
EXC_ERR 10
EXC_ERR 11
EXC_ERR 12
EXC_ERR 13
EXC_ERR 14
EXC_NOERR 15
EXC_NOERR 16
EXC_ERR 17
EXC_NOERR 18
EXC_NOERR 19
EXC_NOERR 20
EXC_ERR 21

exception_common:
    /* Stack: vector, error code, rip, cs, rflags, rsp, ss. */
    mov %rsp, %rdi
    and $-16, %rsp
    call exception_handler
5:  cli
    hlt
    jmp 5b

    .section .rodata
    .globl exception_stubs
    .balign 8
exception_stubs:
    .quad exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7
    .quad exc_8, exc_9, exc_10, exc_11, exc_12, exc_13, exc_14, exc_15
    .quad exc_16, exc_17, exc_18, exc_19, exc_20, exc_21
    .globl device_isrs
device_isrs:
    .quad device_isr_0, device_isr_1, device_isr_2, device_isr_3
    .quad device_isr_4, device_isr_5, device_isr_6, device_isr_7

/* GDT: null, 32-bit code, data, 64-bit code. */
    .balign 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF
    .quad 0x00CF93000000FFFF
    .quad 0x00AF9B000000FFFF
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

/* Identity map of the first 4 GiB: PML4 -> PDPT -> 4 page directories of 2 MiB pages. */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4, pdpt
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x3
    .quad pd + 0x1000 + 0x3
    .quad pd + 0x2000 + 0x3
    .quad pd + 0x3000 + 0x3
    .fill 508, 8, 0
pd:
    .set addr, 0
    .rept 1536
    .quad addr + 0x83
    .set addr, addr + 0x200000
    .endr
    /* 3-4 GiB holds the LAPIC/IOAPIC windows: uncached. */
    .rept 512
    .quad addr + 0x9B
    .set addr, addr + 0x200000
    .endr

    .bss
    .balign 16
boot_stack:
    .skip 16384
boot_stack_top:
    .globl ap_boot_stack
ap_boot_stack:
    .skip 8
