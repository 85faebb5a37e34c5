// SIZE parsing (QEMU style: 256M, 1G, 4096, 1.5K, 0x1000).
import assert from 'node:assert/strict';
import { ERR_INVALID_SIZE, SizeError, formatSize, parseSize } from '../../lib/util/size';

describe('size parsing', function () {
  it('accepts QEMU sizes', function () {
    const cases: [string, number][] = [
      ['4096', 4096],
      ['0', 0],
      ['1K', 1024],
      ['1k', 1024],
      ['256M', 256 << 20],
      ['256m', 256 << 20],
      ['1G', 2 ** 30],
      ['2T', 2 * 2 ** 40],
      ['1P', 2 ** 50],
      ['1.5K', 1536],
      ['0.5G', 2 ** 29],
      ['512B', 512],
      ['0x1000', 4096],
      ['0x10M', 16 << 20],
      [' 64M ', 64 << 20],
      ['.5M', 512 << 10],
    ];
    for (const [text, bytes] of cases) assert.equal(parseSize(text), bytes, text);
  });

  it('applies a default unit to bare numbers (QEMU -m)', function () {
    assert.equal(parseSize('256', { defaultUnit: 'M' }), 256 << 20);
    assert.equal(parseSize('1G', { defaultUnit: 'M' }), 2 ** 30);
  });

  it('says what was wrong', function () {
    const reason = (text: string): string => {
      try {
        parseSize(text);
      } catch (e) {
        assert.ok(e instanceof SizeError);
        assert.equal(e.code, ERR_INVALID_SIZE);
        assert.equal(e.input, text);
        assert.equal(e.message, `invalid size '${text}': ${e.reason}`);
        return e.reason;
      }
      assert.fail(`${text} parsed`);
    };
    assert.equal(reason('12Q'), "unknown size suffix 'Q' (expected a number with optional K, M, G or T suffix)");
    assert.equal(reason('1KiB'), "unknown size suffix 'KiB' (write K, sizes are powers of 1024)");
    assert.equal(reason('1MB'), "unknown size suffix 'MB' (write M, sizes are powers of 1024)");
    assert.equal(reason('1GG'), "unknown size suffix 'GG' (expected a number with optional K, M, G or T suffix)");
    assert.equal(reason(''), 'empty size (expected a number with optional K, M, G or T suffix)');
    assert.equal(reason('M'), 'not a number (expected a number with optional K, M, G or T suffix)');
    assert.equal(reason('-1G'), 'negative sizes are not allowed');
    assert.equal(reason('0.1'), 'not a whole number of bytes');
    assert.equal(reason('9E'), 'too large (at most 8P - 1 bytes)');
    assert.equal(reason('0xffffffffffffffffff'), 'too large (at most 8P - 1 bytes)');
  });

  it('formats with the largest exact suffix', function () {
    assert.equal(formatSize(2 ** 30), '1G');
    assert.equal(formatSize(256 << 20), '256M');
    assert.equal(formatSize(1536), '1536');
    assert.equal(formatSize(3 << 10), '3K');
  });
});
