import assert from 'node:assert/strict';

import { GIB, planRamSlots } from '../../lib/machine/ram';
import { canTransition, checkTransition, needsReset, RUN_STATES } from '../../lib/machine/runstate';
import { decodeCpuid, decodeRegs, emptyRegs, encodeCpuid, encodeRegs, vcpuCpuid, type CpuidEntry } from '../../lib/machine/x86';

describe('machine: RAM layout, run states, x86 structs', () => {
  it('pvh RAM up to 3 GiB is one slot at GPA 0', () => {
    assert.deepEqual(planRamSlots(256 << 20, true), [{ slot: 0, gpa: 0, offset: 0, size: 256 << 20 }]);
    assert.deepEqual(planRamSlots(3 * GIB, true), [{ slot: 0, gpa: 0, offset: 0, size: 3 * GIB }]);
  });

  it('pvh RAM above 3 GiB continues at 4 GiB (PCI hole); none is contiguous', () => {
    assert.deepEqual(planRamSlots(5 * GIB, true), [
      { slot: 0, gpa: 0, offset: 0, size: 3 * GIB },
      { slot: 1, gpa: 4 * GIB, offset: 3 * GIB, size: 2 * GIB },
    ]);
    assert.deepEqual(planRamSlots(5 * GIB, false), [{ slot: 0, gpa: 0, offset: 0, size: 5 * GIB }]);
  });

  it('run-state transitions follow QEMU (and refuse the rest)', () => {
    assert.ok(canTransition('prelaunch', 'running'));
    assert.ok(canTransition('running', 'paused'));
    assert.ok(canTransition('running', 'finish-migrate'));
    assert.ok(canTransition('finish-migrate', 'postmigrate'));
    assert.ok(canTransition('inmigrate', 'running'));
    assert.ok(canTransition('postmigrate', 'running'));
    assert.ok(!canTransition('shutdown', 'running'));
    assert.ok(!canTransition('inmigrate', 'save-vm'));
    assert.throws(() => checkTransition('shutdown', 'running'), { code: 'ERR_INVALID_RUNSTATE_TRANSITION' });
    for (const s of RUN_STATES) assert.ok(canTransition(s, s), `${s} -> ${s} is a no-op`);
    assert.deepEqual(RUN_STATES.filter(needsReset), ['internal-error', 'shutdown', 'guest-panicked']);
  });

  it('kvm_regs round-trips', () => {
    const r = emptyRegs();
    r.rip = 0xffffffff81000000n;
    r.rbx = 0x1234n;
    r.r15 = (1n << 64n) - 1n;
    const b = encodeRegs(r);
    assert.equal(b.length, 144);
    assert.equal(b.readBigUInt64LE(16 * 8), r.rip);
    assert.deepEqual(decodeRegs(b), r);
  });

  it('per-vCPU CPUID: APIC ids, topology, no KVM PV features', () => {
    const base: CpuidEntry[] = [
      { function: 1, index: 0, flags: 0, eax: 0xa10f11, ebx: 0x00020800, ecx: 0x81202000, edx: 0x078bfbff },
      { function: 0xb, index: 0, flags: 1, eax: 0, ebx: 0, ecx: 0, edx: 0 },
      { function: 0xb, index: 1, flags: 1, eax: 0, ebx: 0, ecx: 0, edx: 0 },
      { function: 0x40000001, index: 0, flags: 0, eax: 0x1007efb, ebx: 0, ecx: 0, edx: 0 },
    ];
    const raw = encodeCpuid(base);
    assert.deepEqual(decodeCpuid(raw), base);
    const c = vcpuCpuid(base, 3, 4);
    const leaf = (f: number, i = 0) => c.find((e) => e.function === f && e.index === i)!;
    assert.equal(leaf(1).ebx >>> 24, 3, 'initial APIC id');
    assert.equal((leaf(1).ebx >>> 16) & 0xff, 4, 'logical processor count');
    assert.equal(leaf(1).ebx & 0xffff, 0x0800, 'CLFLUSH size kept');
    assert.equal(leaf(0xb, 0).edx, 3);
    assert.equal(leaf(0xb, 1).edx, 3);
    assert.equal(leaf(0xb, 1).ebx, 4);
    assert.equal(leaf(0xb, 1).eax, 2, 'core shift for 4 vCPUs');
    assert.equal(leaf(0x40000001).eax, 0, 'no kvmclock/PV features');
    assert.equal(base[0]!.ebx, 0x00020800, 'input untouched');
  });
});
