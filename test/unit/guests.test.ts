/** lib/guests.ts without KVM: paths, serial line parsing, memwriter's page format. */
import assert from 'node:assert/strict';
import path from 'node:path';

import { GUESTS, guestPath, listGuests, memwriterPage, parseGuestLine, parseGuestOutput, readMemwriterStamp } from '../../lib/guests';

describe('guests: images and serial lines', () => {
  it('resolves guests/out/<name>.elf under the package root', () => {
    assert.deepEqual(
      GUESTS.map((g) => g.name),
      ['memwriter', 'ticker'],
    );
    const p = guestPath('memwriter');
    assert.ok(path.isAbsolute(p));
    assert.match(p, /guests\/out\/memwriter\.elf$/);
    assert.equal(listGuests().length, GUESTS.length);
    assert.throws(() => guestPath('nope'), { code: 'ERR_UNKNOWN_GUEST' });
  });

  it('parses every line format the guests print', () => {
    assert.deepEqual(parseGuestLine('memwriter ready ram=268038144 ws=33554432'), { kind: 'memwriter-ready', ram: 268038144, ws: 33554432 });
    assert.deepEqual(parseGuestLine('tick 3 writes=10 verified=9 errors=1'), { kind: 'memwriter-tick', n: 3, writes: 10, verified: 9, errors: 1 });
    assert.deepEqual(parseGuestLine('ticker ready hz=100'), { kind: 'ticker-ready', hz: 100 });
    assert.deepEqual(parseGuestLine('tick 7 irqs=71\r'), { kind: 'ticker-tick', n: 7, irqs: 71 });
    assert.deepEqual(parseGuestLine('CORRUPT gpa=0x1a2000 expected=5 found=0 stamp=0x0'), { kind: 'corrupt', gpa: 0x1a2000, expected: 5, found: 0 });
    assert.deepEqual(parseGuestLine('error unknown parameter x'), { kind: 'error', message: 'unknown parameter x' });
    assert.deepEqual(parseGuestLine('info ram 0x100000-0x10000000'), { kind: 'info-ram', start: 0x100000, end: 0x10000000 });
    assert.equal(parseGuestLine('tick 3 writes=1'), undefined);
    // a trailing partial line is not parsed yet
    assert.deepEqual(
      parseGuestOutput('tick 1 irqs=10\ntick 2 irq').map((l) => l.kind),
      ['ticker-tick'],
    );
  });

  it('memwriter page format: stamp round trip, damage detected', () => {
    const gpa = 0x1234000;
    const page = memwriterPage(gpa, 42);
    assert.equal(page.length, 4096);
    assert.equal(page.readBigUInt64LE(0), BigInt(gpa));
    assert.deepEqual(readMemwriterStamp(page, gpa), { stamped: true, gen: 42 });
    assert.equal(readMemwriterStamp(page, gpa + 4096).stamped, false, 'wrong address');
    const torn = Buffer.from(page);
    torn[4095] ^= 1;
    assert.equal(readMemwriterStamp(torn, gpa).stamped, false, 'wrong tail');
    assert.notDeepEqual(memwriterPage(gpa, 43), page);
  });
});
