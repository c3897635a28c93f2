"""Small Multiboot test kernels assembled with keystone (a.out-kludge images loaded at 1 MiB).

build(ring0, ring3): flat ring-0 and ring-3 segments, a TSS, an IDT whose handlers reload DS
(a body may fault with a null or small DS), then record (vector, error code, CR2, saved EIP,
saved CS) into a results area and stop the CPU, then a ring-0 body and (optionally) a ring-3
body.  Used by tests/test_system.py and the tests built on it; tests/reporting.py builds the
kernels that print what they observe (tests/test_qemu_recorded.py).
"""
from keystone import Ks, KS_ARCH_X86, KS_MODE_32

BASE = 0x100000
RESULTS = 0x300000   # vector, error, cr2, eip, cs, marker, eflags

TEMPLATE = r"""
.set results, 0x300000
.set page_dir, 0x301000
.set page_tab, 0x302000
.set idt, 0x303000
.set tss, 0x304000
.set kstack_top, 0x306000
.set ustack_top, 0x308000
header:
    .long 0x1BADB002
    .long 0x00010002
    .long -(0x1BADB002 + 0x00010002)
    .long header
    .long header
    .long image_end
    .long 0
    .long start
start:
    mov esp, kstack_top
    # The ring-3 bodies run with IF set, and the PICs are as reset left them (no BIOS): IRQ0
    # requested, vectors 0-15.  Mask them all, as an OS does before it enables interrupts.
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    lgdt [gdt_desc]
    .byte 0xea
    .long reload
    .word 0x08
reload:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor ecx, ecx
fill:
    mov eax, ecx
    shl eax, 4
    add eax, handler_table
    lea edi, [idt + ecx*8]
    mov word ptr [edi], ax
    mov word ptr [edi + 2], 0x08
    mov word ptr [edi + 4], 0x8e00
    shr eax, 16
    mov word ptr [edi + 6], ax
    inc ecx
    cmp ecx, 256
    jb fill
    mov word ptr [idt + 0x80*8 + 4], 0xee00
    lidt [idt_desc]
    mov eax, tss
    mov word ptr [gdt + 0x2a], ax
    shr eax, 16
    mov byte ptr [gdt + 0x2c], al
    mov byte ptr [gdt + 0x2f], ah
    mov dword ptr [tss + 4], kstack_top
    mov dword ptr [tss + 8], 0x10
    mov word ptr [tss + 0x66], 0x68
    mov ax, 0x28
    ltr ax
{ring0}
    mov dword ptr [results + 20], 0x600d
    cli
    hlt
to_user:
    push 0x23
    mov eax, ustack_top
    push eax
    push 0x202
    push 0x1b
    mov eax, user
    push eax
    iretd
user:
    mov ax, 0x23
    mov ds, ax
    mov es, ax
{ring3}
    mov dword ptr [results + 20], 0x600d
    int 0x80
user_spin:
    jmp user_spin

common:
    mov bx, 0x10
    mov ds, bx
    pop eax
    mov dword ptr [results], eax
    mov dword ptr [results + 12], 0
    cmp eax, 17
    je has_err
    cmp eax, 8
    je has_err
    cmp eax, 10
    jb no_err
    cmp eax, 14
    ja no_err
has_err:
    pop ebx
    mov dword ptr [results + 4], ebx
    jmp saved
no_err:
    mov dword ptr [results + 4], 0xffffffff
saved:
    mov ebx, cr2
    mov dword ptr [results + 8], ebx
    mov ebx, dword ptr [esp]
    mov dword ptr [results + 12], ebx
    mov ebx, dword ptr [esp + 4]
    mov dword ptr [results + 16], ebx
    mov ebx, dword ptr [esp + 8]
    mov dword ptr [results + 24], ebx
    cli
    hlt

.align 8
handler_table:
{stubs}
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
image_end:
"""

_ks = Ks(KS_ARCH_X86, KS_MODE_32)


def assemble(src, base=BASE):
    enc, _ = _ks.asm(src.replace(";", "#"), base)
    return bytes(enc)


def _stubs():
    # 16-byte stubs: push imm32 vector; jmp rel32 common; padding
    out = []
    for v in range(256):
        out.append(f"    .byte 0x68\n    .long {v}\n    .byte 0xe9\n    .long common - (handler_table + {v} * 16 + 10)\n"
                   "    .byte 0x90, 0x90, 0x90, 0x90, 0x90, 0x90\n")
    return "".join(out)


def build(ring0="", ring3=None):
    body0 = ring0 + ("\n    jmp to_user\n" if ring3 is not None else "")
    src = TEMPLATE.replace("{ring0}", body0).replace("{ring3}", ring3 or "").replace("{stubs}", _stubs())
    return assemble(src)


PAGING = """
    mov edi, page_tab
    xor eax, eax
pt_fill:
    mov ebx, eax
    shl ebx, 12
    or ebx, 7
    mov dword ptr [edi + eax*4], ebx
    inc eax
    cmp eax, 1024
    jb pt_fill
    mov dword ptr [page_dir], page_tab + 7
    mov dword ptr [page_tab + 0x200*4], 0
    mov dword ptr [page_tab + 0x201*4], 0x201005
    mov eax, page_dir
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80010000
    mov cr0, eax
"""


def pic_and_pit(imr=0xFE, mode=0, count=256):
    """Ring-0 code that initialises the master 8259 (IRQs at vectors 0x20-0x27, mask imr) and
    starts 8254 channel 0 in mode (0: one-shot, 2: rate generator) with count."""
    return f"""
    mov al, 0x11
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 4
    out 0x21, al
    mov al, 1
    out 0x21, al
    mov al, {imr:#x}
    out 0x21, al
    mov al, {0x30 | mode << 1:#x}
    out 0x43, al
    mov al, {count & 0xFF:#x}
    out 0x40, al
    mov al, {count >> 8 & 0xFF:#x}
    out 0x40, al
"""
