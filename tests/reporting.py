"""Multiboot kernels that print what they observe, in hex, to COM1, for comparison with QEMU.

A kernel is a body of ring-0 assembly between a common prologue and epilogue.  The prologue sets
up a GDT (flat ring 0/3 segments, a TSS, and odd segments for the fault tests), an IDT of interrupt
gates (vector 0x80 callable from ring 3), a TSS whose I/O bitmap lets ring 3 use only COM1
(0x3F8-0x3FF, so ring-3 code can print), masks both PICs and prints "@@ NAME".  Every vector goes
to one handler that either calls a hook (hooks[vector], for IRQ handlers) and IRETs, or prints
"vec= err= eip= cs= efl= frame=" (+ "ss:esp=" from ring 3, "cr2=" for #PF) and then resumes at
[resume] in ring 0 with a fresh stack if set, else IRETs.  The epilogue prints "done" and leaves
through isa-debug-exit (status 0x21).  Nothing prints firmware-dependent state: the kernels
program the PIC, PIT, UART and RTC themselves before relying on them.
"""
from tests.kernels import assemble

EXIT_STATUS = (0x10 << 1) | 1
HAS_ERROR = (8, 10, 11, 12, 13, 14, 17)

PROLOGUE = r"""
.set resume, 0x300000
.set scratch, 0x300010
.set hooks, 0x300400
.set logbuf, 0x300800
.set page_dir, 0x301000
.set page_tab, 0x302000
.set idt, 0x303000
.set tss, 0x304000
.set kstack_top, 0x308000
.set ustack_top, 0x30a000
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
    cli
    cld
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
    mov edi, 0x300000
    xor eax, eax
    mov ecx, 0x400
    rep stosd
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
    mov edi, tss
    xor eax, eax
    mov ecx, 0x1a
    rep stosd
    mov dword ptr [tss + 4], kstack_top
    mov dword ptr [tss + 8], 0x10
    mov word ptr [tss + 0x66], 0x68
    mov edi, tss + 0x68
    mov al, 0xff
    mov ecx, 0x2001
    rep stosb
    mov byte ptr [tss + 0x68 + 0x7f], 0
    mov ax, 0x28
    ltr ax
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
    mov al, 0xff
    out 0x21, al
    out 0xa1, al
    mov dx, 0x3fb
    mov al, 0x83
    out dx, al
    mov dx, 0x3f8
    mov al, 1
    out dx, al
    inc dx
    xor al, al
    out dx, al
    mov dx, 0x3fb
    mov al, 3
    out dx, al
    dec dx
    xor al, al
    out dx, al
    mov dx, 0x3fc
    mov al, 3
    out dx, al
    mov dx, 0x3f9
    xor al, al
    out dx, al
"""

EPILOGUE = r"""
    mov al, 0x10
    out 0xf4, al
    cli
    hlt

common:
    ; push ds/es and pop es/ds as bytes: keystone encodes them with an operand-size prefix
    pushad
    .byte 0x1e, 0x06
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    lea ebp, [esp + 40]
    mov eax, dword ptr [ebp]
    mov ecx, dword ptr [hooks + eax*4]
    test ecx, ecx
    jz report
    call ecx
    jmp leave_iret
report:
    call print_frame
    mov eax, dword ptr [resume]
    test eax, eax
    jz leave_iret
    mov dword ptr [resume], 0
    mov cx, 0x10
    mov ss, cx
    mov esp, kstack_top
    jmp eax
leave_iret:
    .byte 0x07, 0x1f
    popad
    add esp, 8
    iretd

print_frame:
    call say
    .byte 0x76, 0x65, 0x63, 0x3d, 0
    mov eax, dword ptr [ebp]
    call hex2
    cmp eax, 8
    je pf_err
    cmp eax, 17
    je pf_err
    cmp eax, 10
    jb pf_noerr
    cmp eax, 14
    ja pf_noerr
pf_err:
    call say
    .byte 0x20, 0x65, 0x72, 0x72, 0x3d, 0
    mov eax, dword ptr [ebp + 4]
    call hex8
pf_noerr:
    call say
    .byte 0x20, 0x65, 0x69, 0x70, 0x3d, 0
    mov eax, dword ptr [ebp + 8]
    call hex8
    call say
    .byte 0x20, 0x63, 0x73, 0x3d, 0
    mov eax, dword ptr [ebp + 12]
    call hex4
    call say
    .byte 0x20, 0x65, 0x66, 0x6c, 0x3d, 0
    mov eax, dword ptr [ebp + 16]
    ; RF masked: the SDM (17.3.1.1) has it set in a fault's frame, which btvm does, QEMU's TCG not
    and eax, 0xfffeffff
    call hex8
    call say
    .byte 0x20, 0x66, 0x72, 0x61, 0x6d, 0x65, 0x3d, 0
    lea eax, [ebp + 8]
    call hex8
    test byte ptr [ebp + 12], 3
    jz pf_ring0
    call say
    .byte 0x20, 0x73, 0x73, 0x3a, 0x65, 0x73, 0x70, 0x3d, 0
    mov eax, dword ptr [ebp + 24]
    call hex4
    mov al, 0x3a
    call putc
    mov eax, dword ptr [ebp + 20]
    call hex8
pf_ring0:
    cmp dword ptr [ebp], 14
    jne pf_end
    call say
    .byte 0x20, 0x63, 0x72, 0x32, 0x3d, 0
    mov eax, cr2
    call hex8
pf_end:
    mov al, 0x0a
    call putc
    ret

putc:
    push edx
    push eax
    mov dx, 0x3fd
putc_wait:
    in al, dx
    test al, 0x20
    jz putc_wait
    pop eax
    mov dx, 0x3f8
    out dx, al
    pop edx
    ret

say:
    xchg esi, dword ptr [esp]
    push eax
say_next:
    lodsb
    test al, al
    jz say_end
    call putc
    jmp say_next
say_end:
    pop eax
    xchg esi, dword ptr [esp]
    ret

hex2:
    pushad
    mov edx, eax
    shl edx, 24
    mov ecx, 2
    jmp hex_loop
hex4:
    pushad
    mov edx, eax
    shl edx, 16
    mov ecx, 4
    jmp hex_loop
hex8:
    pushad
    mov edx, eax
    mov ecx, 8
hex_loop:
    rol edx, 4
    mov al, dl
    and al, 0x0f
    add al, 0x30
    cmp al, 0x39
    jbe hex_digit
    add al, 7
hex_digit:
    call putc
    loop hex_loop
    popad
    ret

.align 16
handler_table:
{stubs}
.align 8
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cffa000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x0000890000002068
    .quad 0x00cf12000000ffff
    .quad 0x0040920000000fff
    .quad 0x00cf90000000ffff
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
idt_desc:
    .word 256*8 - 1
    .long idt
image_end:
"""
# GDT: 0x08/0x10 ring-0 code/data, 0x1B/0x23 ring-3 code/data, 0x28 TSS (limit covers the I/O
# bitmap), 0x30 data not present, 0x38 data with limit 0xFFF, 0x48 read-only data.


def _stubs():
    # 16 bytes each: (push 0 for a vector without an error code, so every frame has one) push imm32
    # vector; jmp common.
    out = []
    for v in range(256):
        fake = "0x90, 0x90" if v in HAS_ERROR else "0x6a, 0x00"
        out.append(f"    .byte {fake}\n    .byte 0x68\n    .long {v}\n    .byte 0xe9\n"
                   f"    .long common - (handler_table + {v} * 16 + 12)\n    .byte 0x90, 0x90, 0x90, 0x90\n")
    return "".join(out)


class Kernel:
    """Builds a kernel body; methods append assembly and return self."""

    def __init__(self, name):
        self.name, self.lines, self._n = name, [], 0
        self.say(f"@@ {name}\n")

    def asm(self, text):
        self.lines.append(text.strip("\n") + "\n")
        return self

    def label(self, stem="l"):
        self._n += 1
        return f"{stem}_{self._n}"

    def say(self, text):
        data = ", ".join(str(b) for b in text.encode() + b"\0")
        return self.asm(f"    call say\n    .byte {data}")

    def show(self, text, operand, digits=8, size="dword"):
        """Print text then operand (a register or memory operand) in hex; keeps all registers."""
        load = f"movzx eax, {size} ptr {operand}" if operand.startswith("[") and size != "dword" else \
            f"mov eax, {'dword ptr ' if operand.startswith('[') else ''}{operand}"
        if operand in ("ax", "al", "cx", "dx", "bx"):
            load = f"movzx eax, {operand}"
        self.say(text)
        return self.asm(f"    push eax\n    {load}\n    call hex{digits}\n    pop eax")

    def fault(self, text, code, after=""):
        """Print text, run code in ring 0 (expected to fault: the handler prints the frame and
        resumes after it), then run after."""
        end = self.label("resume")
        self.say(f"{text}: ")
        self.asm(f"    mov dword ptr [resume], {end}\n{code}")
        # Where the expected fault does not come (QEMU's TCG skips some checks), the code may have
        # left odd segments: restore them as the handler would before printing.
        self.asm("    mov ax, 0x10\n    mov ds, ax\n    mov es, ax\n    mov ss, ax\n    mov esp, kstack_top")
        self.say("no fault\n")
        return self.asm(f"{end}:\n{after}")

    def fault3(self, text, code, eflags=0x2, after=""):
        """Like fault, but code runs in ring 3 (entered by IRET with the given EFLAGS)."""
        end, user = self.label("resume"), self.label("user")
        self.say(f"{text}: ")
        self.asm(f"""
    mov dword ptr [resume], {end}
    push 0x23
    push ustack_top
    push {eflags:#x}
    push 0x1b
    mov eax, {user}
    push eax
    iretd
{user}:
    mov ax, 0x23
    mov ds, ax
    mov es, ax
{code}""")
        self.say("no fault\n")
        return self.asm(f"    int 0x80\n{end}:\n{after}")

    def image(self):
        self.say("done\n")
        src = PROLOGUE + "".join(self.lines) + EPILOGUE.replace("{stubs}", _stubs())
        return assemble(src)
