"""The built-in demo guest: a tiny Multiboot kernel that exercises system mode.

It sets up its own GDT, IDT and TSS, programs the PIC, the PIT and the COM1
UART, counts timer interrupts with HLT, turns on paging with a 4 MiB PSE page,
drops to ring 3 with IRET, makes a system call with INT 0x80, and shows that
CLI in ring 3 raises #GP, then stops the CPU (CLI; HLT) - which btvm treats as
a power-off.  It is assembled with keystone when first needed.
"""
import functools
import struct

BASE = 0x100000

SOURCE = r"""
header:
    .long 0x1BADB002
    .long 0x00010002
    .long -(0x1BADB002 + 0x00010002)
    .long header
    .long header
    .long image_end
    .long bss_end
    .long start

start:
    mov esp, kstack_top
    lgdt [gdt_desc]
    .byte 0xea
    .long reload
    .word 0x08
reload:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov fs, ax
    mov gs, ax

    ; COM1: 115200 8N1, FIFO on, interrupts off (polled output)
    mov dx, 0x3f9
    mov al, 0
    out dx, al
    mov dx, 0x3fb
    mov al, 0x80
    out dx, al
    mov dx, 0x3f8
    mov al, 1
    out dx, al
    mov dx, 0x3f9
    mov al, 0
    out dx, al
    mov dx, 0x3fb
    mov al, 3
    out dx, al
    mov dx, 0x3fa
    mov al, 0xc7
    out dx, al

    mov esi, msg_banner
    call puts

    ; IDT: every vector -> unexpected; 13 -> gp_handler; 32 -> timer; 0x80 -> syscall (DPL 3)
    xor ecx, ecx
fill_idt:
    mov eax, unexpected
    mov ebx, 0x8e00
    call set_gate
    inc ecx
    cmp ecx, 256
    jb fill_idt
    mov ecx, 13
    mov eax, gp_handler
    mov ebx, 0x8e00
    call set_gate
    mov ecx, 32
    mov eax, timer_handler
    mov ebx, 0x8e00
    call set_gate
    mov ecx, 0x80
    mov eax, syscall_handler
    mov ebx, 0xef00
    call set_gate
    lidt [idt_desc]

    ; 8259A: remap to 0x20/0x28, only IRQ0 unmasked
    mov al, 0x11
    out 0x20, al
    out 0xa0, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x28
    out 0xa1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xa1, al
    mov al, 1
    out 0x21, al
    out 0xa1, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0xff
    out 0xa1, al

    ; 8254 channel 0: mode 2, 100 Hz
    mov al, 0x34
    out 0x43, al
    mov ax, 11932
    out 0x40, al
    mov al, ah
    out 0x40, al

    sti
wait_ticks:
    hlt
    cmp dword ptr [ticks], 10
    jb wait_ticks
    cli
    mov esi, msg_ticks
    call puts

    ; paging: identity-map the first 4 MiB with one PSE page, user accessible
    mov dword ptr [page_dir], 0x87
    mov eax, cr4
    or eax, 0x10
    mov cr4, eax
    mov eax, page_dir
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov esi, msg_paging
    call puts

    ; TSS for the ring 3 -> 0 stack switch
    mov eax, tss
    mov word ptr [gdt + 0x2a], ax
    shr eax, 16
    mov byte ptr [gdt + 0x2c], al
    mov byte ptr [gdt + 0x2f], ah
    mov dword ptr [tss + 4], kstack_top
    mov dword ptr [tss + 8], 0x10
    mov ax, 0x28
    ltr ax

    ; to ring 3
    push 0x23
    mov eax, ustack_top
    push eax
    push 0x202
    push 0x1b
    mov eax, user_main
    push eax
    iretd

user_main:
    mov ax, 0x23
    mov ds, ax
    mov es, ax
    mov eax, 4
    mov ebx, msg_user
    int 0x80
    cli
    mov eax, 4
    mov ebx, msg_bad
    int 0x80
user_spin:
    jmp user_spin

; ---- kernel routines ----
puts:
    lodsb
    test al, al
    jz puts_done
    mov ah, al
    mov dx, 0x3fd
puts_wait:
    in al, dx
    test al, 0x20
    jz puts_wait
    mov al, ah
    mov dx, 0x3f8
    out dx, al
    jmp puts
puts_done:
    ret

set_gate:
    lea edi, [idt + ecx*8]
    mov word ptr [edi], ax
    mov word ptr [edi + 2], 0x08
    mov word ptr [edi + 4], bx
    shr eax, 16
    mov word ptr [edi + 6], ax
    ret

timer_handler:
    push eax
    inc dword ptr [ticks]
    mov al, 0x20
    out 0x20, al
    pop eax
    iretd

syscall_handler:
    push esi
    push edx
    push eax
    mov esi, ebx
    call puts
    pop eax
    pop edx
    pop esi
    iretd

gp_handler:
    mov esi, msg_gp
    call puts
    cmp dword ptr [esp + 8], 0x1b
    jne stop
    mov esi, msg_bye
    call puts
stop:
    cli
    hlt
    jmp stop

unexpected:
    mov esi, msg_unexpected
    call puts
    cli
    hlt

msg_banner: .asciz "btvm demo guest: protected mode, serial console up\n"
msg_ticks: .asciz "demo: 10 timer interrupts received (PIT 100 Hz via 8259A, HLT between them)\n"
msg_paging: .asciz "demo: paging on (4 MiB PSE page)\n"
msg_user: .asciz "demo: hello from ring 3 through INT 0x80\n"
msg_bad: .asciz "demo: CLI in ring 3 did not fault!\n"
msg_gp: .asciz "demo: #GP from CLI in ring 3, as the SDM says\n"
msg_bye: .asciz "demo: done, powering off\n"
msg_unexpected: .asciz "demo: unexpected interrupt\n"

.align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cffa000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x0000890000000067
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
idt_desc:
    .word 256*8 - 1
    .long idt
ticks: .long 0
image_end:
"""

BSS = {"idt": 0x800, "tss": 0x68, "page_dir": 0x1000, "kstack": 0x1000, "ustack": 0x1000}


@functools.lru_cache(maxsize=1)
def image():
    """The demo kernel as a Multiboot a.out-kludge image loaded at 1 MiB."""
    from keystone import Ks, KS_ARCH_X86, KS_MODE_32
    ks = Ks(KS_ARCH_X86, KS_MODE_32)
    # First pass to size the image; bss symbols follow it, page-aligned.
    def assemble(end):
        a = end
        syms = []
        for name, size in (("page_dir", 0x1000), ("idt", 0x800), ("tss", 0x68), ("kstack", 0x1000), ("ustack", 0x1000)):
            a = (a + 0xFFF) & ~0xFFF if name == "page_dir" else (a + 15) & ~15
            syms.append(f".set {name}, {a:#x}")
            if name in ("kstack", "ustack"):
                syms.append(f".set {name}_top, {a + size:#x}")
            a += size
        syms.append(f".set bss_end, {a:#x}")
        text = "\n".join(syms) + "\n" + SOURCE.replace(";", "#")
        enc, _ = ks.asm(text, BASE)
        return bytes(enc)
    code = assemble(BASE + 0x2000)
    code = assemble(BASE + len(code))
    return code
