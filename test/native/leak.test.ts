// Creating and closing machines leaks nothing: no fds, no threads, no
// mappings. close() must free deterministically (no reliance on GC).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { native } from '../../lib/native';
import { CODE_GPA, GUEST, HAVE_KVM, PAGE, setRealMode, sleep, TSS_GPA, until } from './helpers/guest';

interface Usage {
  fds: number;
  tasks: number;
  maps: number;
  vcpuMaps: number;
  memfdMaps: number;
}

function usage(): Usage {
  const maps = fs.readFileSync('/proc/self/maps', 'utf8').trimEnd().split('\n');
  return {
    fds: fs.readdirSync('/proc/self/fd').length,
    tasks: fs.readdirSync('/proc/self/task').length,
    maps: maps.length,
    vcpuMaps: maps.filter((l) => l.includes('kvm-vcpu')).length,
    memfdMaps: maps.filter((l) => l.includes('ferry-guest-ram')).length,
  };
}

/** One full machine: Kvm + Vm + memory + irqchip + PIT + 2 running vCPU threads + views. */
async function cycle(i: number): Promise<void> {
  const b = native();
  const kvm = new b.Kvm();
  const vm = kvm.createVm();
  const mem = new b.GuestMemory(1 << 20, { memfd: i % 2 === 1 });
  vm.setTssAddr(TSS_GPA);
  vm.createIrqchip();
  vm.createPit2(0);
  vm.setMemorySlot(0, 0, mem, 0, 1 << 20, i % 3 === 0 ? 1 : 0);
  const code = new Uint8Array(mem.view(CODE_GPA, PAGE));
  code.set(GUEST.spin, 0);
  code.set(GUEST.halt, 0x100);
  const views = [mem.view(0, PAGE), mem.view(0x10000, 0x10000)];
  const v0 = vm.createVcpu(0);
  const v1 = vm.createVcpu(1);
  setRealMode(v0, CODE_GPA);
  setRealMode(v1, CODE_GPA + 0x100);
  v0.start(() => {}, true); // spins in KVM_RUN
  v1.start(() => {}, true); // halts inside KVM_RUN (in-kernel irqchip)
  if (i % 4 === 0) {
    await sleep(1);
    await v0.pause(); // a parked thread must stop as well as a running one
  }
  vm.close();
  mem.close();
  kvm.close();
  assert.equal(views[1].byteLength, 0, 'views detached by close()');
}

describe(HAVE_KVM ? 'native: leaks' : 'native: leaks (skipped: /dev/kvm missing)', function () {
  before(function () {
    if (!HAVE_KVM) this.skip();
  });

  it('100 machines created and closed leak no fds, threads or mappings', async function () {
    this.timeout(120000);
    // Warm up: glibc caches thread stacks, V8 and libuv grow their pools once.
    for (let i = 0; i < 4; i++) await cycle(i);
    global.gc?.();
    const before = usage();
    const t0 = Date.now();
    for (let i = 0; i < 100; i++) await cycle(i);
    const ms = Date.now() - t0;
    global.gc?.();
    // Threads are joined by close(); allow the kernel a moment to reap.
    await until(() => usage().tasks <= before.tasks, 2000, 'tasks back to baseline');
    const after = usage();
    assert.equal(after.fds, before.fds, 'fds');
    assert.equal(after.tasks, before.tasks, 'threads');
    assert.equal(after.vcpuMaps, before.vcpuMaps, 'kvm_run mappings');
    assert.equal(after.memfdMaps, before.memfdMaps, 'memfd guest RAM mappings');
    // A leaked machine would add at least three lines (RAM + 2 kvm_run); the
    // slack only covers V8/libc growing their own heaps meanwhile.
    assert.ok(after.maps <= before.maps + 16, `maps ${before.maps} -> ${after.maps}`);
    this.test!.title += ` (${(ms / 100).toFixed(1)} ms per machine; maps ${before.maps} -> ${after.maps})`;
  });
});
