"""Motorola MC146818 real-time clock + CMOS RAM at 0x70/0x71 (IRQ8).

Port 0x70 selects the register (bits 0-6) and holds the NMI-disable bit (bit 7, kept in
``nmi_disabled``); port 0x71 reads/writes it. Time comes from the host wall clock at
construction (or ``start_time``, epoch seconds, for determinism) advanced by the virtual
clock; it is kept in UTC unless ``utc=False``.

Registers: 0/2/4 seconds/minutes/hours (1/3/5 their alarms), 6 day of week (1 = Sunday),
7 day of month, 8 month, 9 year, 0x32 century, all BCD or binary per status B.DM, hours
in 24 h or 12 h (bit 7 = PM) per B.24/12. Writing them (normally with B.SET, which freezes
updates) sets the clock. Status A: UIP is 1 from 244 us before each second boundary until
the end of the 1984 us update cycle (registers already show the new second during it),
DV/RS writable. Status B writable (SET clears UIE). Status C: IRQF/PF/AF/UF, cleared by
reading, which also lowers IRQ8. Status D: VRT = 1.
PF is set at the periodic rate selected by RS (when DV = 010) and UF at the end of every
update cycle, whether or not enabled (computed lazily); with PIE/UIE/AIE set a clock timer
raises IRQ8. AF is only evaluated at update ends while AIE is set (or at a status-C read).
CMOS RAM: base memory (0x15/0x16 = 640 KiB), extended memory in KiB (0x17/0x18 and
0x30/0x31, capped at 0xFFFF), memory above 16 MiB in 64 KiB units (0x34/0x35), checksum
of 0x10-0x2D at 0x2E/0x2F.
"""
import calendar
import time as _time

from .bus import NullIRQ

_NS = 1_000_000_000
UIP_BEFORE_NS = 244_000
UPDATE_NS = 1_984_000

REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM, B_24H, B_DSE = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10


def _bcd(v):
    return ((v // 10) << 4) | (v % 10)


def _unbcd(v):
    return (v >> 4) * 10 + (v & 0xF)


class CMOSRTC:
    def __init__(self, clock, ram_mb=128, irq=None, start_time=None, utc=True):
        self.clock = clock
        self.irq = irq or NullIRQ()
        self.utc = utc
        self.ram = bytearray(128)
        self.index = 0
        self.nmi_disabled = False
        if start_time is None:
            start_time = _time.time()
        if not utc:
            start_time = calendar.timegm(_time.localtime(start_time))
        self._base_rtc_ns = int(start_time * _NS)
        self._base_vns = clock.now_ns()
        self._frozen = None                      # broken-down time while B.SET = 1
        self.ram[REG_A] = 0x26                   # 32.768 kHz time base, 1024 Hz periodic rate
        self.ram[REG_B] = B_24H
        self.ram[REG_D] = 0x80
        self._c = 0
        self._pf_seen = self._pf_index(clock.now_ns())
        self._uf_seen = self._uf_index(clock.now_ns())
        self._irq_out = False
        self._timer = clock.timer(self._on_timer, name="rtc")
        self._set_memory(ram_mb)

    # ---- CMOS memory ------------------------------------------------------------------
    def _set_memory(self, ram_mb):
        r = self.ram
        r[0x10] = 0x00                           # no floppy drives
        r[0x12] = 0x00                           # no hard disks
        r[0x14] = 0x02                           # equipment: FPU present, EGA/VGA display
        r[0x15], r[0x16] = 640 & 0xFF, 640 >> 8
        ext_kb = max(0, min(ram_mb * 1024 - 1024, 0xFFFF))
        r[0x17], r[0x18] = ext_kb & 0xFF, ext_kb >> 8
        r[0x30], r[0x31] = ext_kb & 0xFF, ext_kb >> 8
        above16 = max(0, min((ram_mb - 16) * 16, 0xFFFF))
        r[0x34], r[0x35] = above16 & 0xFF, above16 >> 8
        self._checksum()

    def _checksum(self):
        s = sum(self.ram[0x10:0x2E])
        self.ram[0x2E], self.ram[0x2F] = (s >> 8) & 0xFF, s & 0xFF

    # ---- time -------------------------------------------------------------------------
    def rtc_ns(self, now=None):
        if now is None:
            now = self.clock.now_ns()
        return self._base_rtc_ns + now - self._base_vns

    def _vns_of_rtc(self, rtc_ns):
        return rtc_ns - self._base_rtc_ns + self._base_vns

    def _broken(self):
        if self._frozen is not None:
            return dict(self._frozen)
        tm = _time.gmtime(self.rtc_ns() // _NS)
        return {"sec": tm.tm_sec, "min": tm.tm_min, "hour": tm.tm_hour, "mday": tm.tm_mday,
                "mon": tm.tm_mon, "year": tm.tm_year}

    def _set_broken(self, f, keep_fraction=True):
        secs = calendar.timegm((f["year"], f["mon"], f["mday"], f["hour"], f["min"], f["sec"], 0, 0, 0))
        now = self.clock.now_ns()
        frac = self.rtc_ns(now) % _NS if keep_fraction else 0
        self._base_rtc_ns = secs * _NS + frac
        self._base_vns = now
        self._uf_seen = self._uf_index(now)

    def uip(self, now=None):
        frac = self.rtc_ns(now) % _NS
        return frac >= _NS - UIP_BEFORE_NS or frac < UPDATE_NS

    def _enc(self, v):
        return v if self.ram[REG_B] & B_DM else _bcd(v)

    def _dec(self, v):
        return v if self.ram[REG_B] & B_DM else _unbcd(v)

    def _enc_hour(self, h):
        if self.ram[REG_B] & B_24H:
            return self._enc(h)
        return self._enc(h % 12 or 12) | (0x80 if h >= 12 else 0)

    def _dec_hour(self, v):
        if self.ram[REG_B] & B_24H:
            return self._dec(v)
        h = self._dec(v & 0x7F) % 12
        return h + 12 if v & 0x80 else h

    def _time_reg(self, idx):
        f = self._broken()
        if idx == 0: return self._enc(f["sec"])
        if idx == 2: return self._enc(f["min"])
        if idx == 4: return self._enc_hour(f["hour"])
        if idx == 6:
            wd = (calendar.weekday(f["year"], f["mon"], f["mday"]) + 1) % 7 + 1   # Sunday = 1
            return self._enc(wd)
        if idx == 7: return self._enc(f["mday"])
        if idx == 8: return self._enc(f["mon"])
        if idx == 9: return self._enc(f["year"] % 100)
        if idx == 0x32: return self._enc(f["year"] // 100)

    def _write_time_reg(self, idx, v):
        f = self._broken()
        if idx == 0: f["sec"] = min(self._dec(v), 59)
        elif idx == 2: f["min"] = min(self._dec(v), 59)
        elif idx == 4: f["hour"] = min(self._dec_hour(v), 23)
        elif idx == 6: return                                     # derived from the date
        elif idx == 7: f["mday"] = max(1, min(self._dec(v), 31))
        elif idx == 8: f["mon"] = max(1, min(self._dec(v), 12))
        elif idx == 9: f["year"] = f["year"] // 100 * 100 + self._dec(v) % 100
        elif idx == 0x32: f["year"] = self._dec(v) * 100 + f["year"] % 100
        if self._frozen is not None:
            self._frozen = f
        else:
            self._set_broken(f)

    # ---- periodic / update flags ------------------------------------------------------
    def _period_cycles(self):
        a = self.ram[REG_A]
        rs = a & 0x0F
        if rs == 0 or (a & 0x70) != 0x20:
            return None
        if rs <= 2:
            return 1 << (rs + 6)
        return 1 << (rs - 1)

    def periodic_hz(self):
        c = self._period_cycles()
        return None if c is None else 32768 / c

    def _pf_index(self, now):
        c = self._period_cycles()
        return None if c is None else now * 32768 // (c * _NS)

    def _uf_index(self, now):
        return (self.rtc_ns(now) - UPDATE_NS) // _NS

    def _alarm_matches(self):
        r = self.ram
        for reg, alarm in ((0, 1), (2, 3), (4, 5)):
            a = r[alarm]
            if a >= 0xC0:
                continue                                          # "don't care"
            if self._time_reg(reg) != a:
                return False
        return True

    def _refresh_flags(self, now):
        pf = self._pf_index(now)
        if pf is not None and self._pf_seen is not None and pf > self._pf_seen:
            self._c |= C_PF
        self._pf_seen = pf
        if self._frozen is None:
            uf = self._uf_index(now)
            if uf > self._uf_seen:
                self._c |= C_UF
                if self._alarm_matches():
                    self._c |= C_AF
            self._uf_seen = uf
        b = self.ram[REG_B]
        if self._c & ((C_PF if b & B_PIE else 0) | (C_AF if b & B_AIE else 0) | (C_UF if b & B_UIE else 0)):
            self._c |= C_IRQF
        self._set_irq(bool(self._c & C_IRQF))

    def _set_irq(self, level):
        if level != self._irq_out:
            self._irq_out = level
            self.irq.set_level(level)

    def _schedule(self):
        now = self.clock.now_ns()
        b = self.ram[REG_B]
        best = None
        c = self._period_cycles()
        if b & B_PIE and c is not None:
            n = now * 32768 // (c * _NS) + 1
            best = -(-n * c * _NS // 32768)
        if b & (B_UIE | B_AIE) and self._frozen is None:
            t = self._vns_of_rtc((self._uf_index(now) + 1) * _NS + UPDATE_NS)
            best = t if best is None else min(best, t)
        if best is None:
            self._timer.cancel()
        else:
            self._timer.mod(best)

    def _on_timer(self, deadline):
        self._refresh_flags(max(deadline, self.clock.now_ns()))
        self._schedule()

    # ---- ports ------------------------------------------------------------------------
    def io_read(self, port, size):
        if port == 0x70:
            return 0xFF
        idx = self.index
        if idx in (0, 2, 4, 6, 7, 8, 9, 0x32):
            return self._time_reg(idx)
        if idx == REG_A:
            return (self.ram[REG_A] & 0x7F) | (0x80 if self._frozen is None and self.uip() else 0)
        if idx == REG_C:
            self._refresh_flags(self.clock.now_ns())
            v, self._c = self._c, 0
            self._set_irq(False)
            return v
        if idx == REG_D:
            return 0x80
        return self.ram[idx]

    def io_write(self, port, size, value):
        value &= 0xFF
        if port == 0x70:
            self.index = value & 0x7F
            self.nmi_disabled = bool(value & 0x80)
            return
        idx = self.index
        if idx in (0, 2, 4, 6, 7, 8, 9, 0x32):
            self._write_time_reg(idx, value)
        elif idx == REG_A:
            now = self.clock.now_ns()
            self._refresh_flags(now)
            self.ram[REG_A] = value & 0x7F
            self._pf_seen = self._pf_index(now)
            self._schedule()
        elif idx == REG_B:
            now = self.clock.now_ns()
            self._refresh_flags(now)
            if value & B_SET:
                value &= ~B_UIE
                if self._frozen is None:
                    self._frozen = self._broken()
            elif self._frozen is not None:
                f, self._frozen = self._frozen, None
                self._set_broken(f, keep_fraction=False)
            self.ram[REG_B] = value
            self._refresh_flags(now)
            self._schedule()
        elif idx in (REG_C, REG_D):
            pass
        else:
            self.ram[idx] = value

    def register(self, bus):
        bus.register(0x70, 0x71, self)
