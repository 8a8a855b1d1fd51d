import { HsmError } from "./errors.js";

/** Bounds on what the client accepts from the agent, checked before anything is decoded. */
export interface FrameLimits {
  /** Largest message, complete or still arriving. */
  maxMessageBytes: number;
  /** Nesting of arrays and maps (the protocol's answers nest at most 5 deep). */
  maxDepth: number;
  /** Items in one array (list_keys and get_jwks grow with the number of keys). */
  maxArrayItems: number;
  /** Entries in one map. */
  maxMapEntries: number;
  /** Bytes of one str. */
  maxStrBytes: number;
}

const INCOMPLETE = -1;

/** Numbers: the bytes after the type byte (float32/64, uint8..64, int8..64). */
const FIXED_PAYLOAD: Readonly<Record<number, number>> = {
  0xca: 4,
  0xcb: 8,
  0xcc: 1,
  0xcd: 2,
  0xce: 4,
  0xcf: 8,
  0xd0: 1,
  0xd1: 2,
  0xd2: 4,
  0xd3: 8,
};
/** bin, str, array and map with a length field: that field's width. */
const LENGTH_WIDTH: Readonly<Record<number, 1 | 2 | 4>> = {
  0xc4: 1,
  0xc5: 2,
  0xc6: 4,
  0xd9: 1,
  0xda: 2,
  0xdb: 4,
  0xdc: 2,
  0xdd: 4,
  0xde: 2,
  0xdf: 4,
};

function protocolError(message: string): HsmError {
  return new HsmError("protocol_error", message);
}

function readLength(bytes: Uint8Array, at: number, width: 1 | 2 | 4): number {
  if (width === 1) return bytes[at]!;
  if (width === 2) return (bytes[at]! << 8) | bytes[at + 1]!;
  return (
    ((bytes[at]! << 24) >>> 0) + ((bytes[at + 1]! << 16) | (bytes[at + 2]! << 8) | bytes[at + 3]!)
  );
}

/**
 * Where the MessagePack value that starts at `start` ends (one past its last byte), or -1 when
 * it has not fully arrived. Only headers are read: a str or bin is skipped by its length, so the
 * cost is per value, not per byte. Throws a `protocol_error` HsmError for bytes that are not
 * MessagePack, ext values (the protocol has none) and anything past `limits`; the caller then
 * closes the connection, as the agent does with a client that breaks the same rules.
 */
export function frameEnd(bytes: Uint8Array, start: number, limits: FrameLimits): number {
  let pos = start;
  let need = 1; // values still to read at the current nesting level
  const outer: number[] = []; // `need` of each enclosing level
  for (;;) {
    if (pos - start > limits.maxMessageBytes) {
      throw protocolError(`an answer is larger than ${limits.maxMessageBytes} bytes`);
    }
    if (pos >= bytes.length) return INCOMPLETE;
    const b = bytes[pos]!;
    let header = 1;
    let payload = 0;
    let children = 0;
    let isArray = false;
    let strBytes = -1;
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) {
      // fixint, nil, bool
    } else if (b <= 0x8f) {
      children = (b & 0x0f) * 2;
    } else if (b <= 0x9f) {
      children = b & 0x0f;
      isArray = true;
    } else if (b <= 0xbf) {
      payload = strBytes = b & 0x1f;
    } else {
      const fixed = FIXED_PAYLOAD[b];
      const width = LENGTH_WIDTH[b];
      if (fixed !== undefined) {
        header += fixed;
      } else if (width !== undefined) {
        header += width;
        if (pos + header > bytes.length) return INCOMPLETE;
        const n = readLength(bytes, pos + 1, width);
        if (b === 0xdc || b === 0xdd) {
          children = n;
          isArray = true;
        } else if (b === 0xde || b === 0xdf) {
          children = n * 2;
        } else {
          payload = n;
          if (b >= 0xd9) strBytes = n;
        }
      } else {
        throw protocolError(
          `the agent sent a byte that is not MessagePack or not allowed (0x${b.toString(16)})`,
        );
      }
    }
    if (isArray && children > limits.maxArrayItems) {
      throw protocolError(`an answer holds an array of ${children} items`);
    }
    if (!isArray && children > 2 * limits.maxMapEntries) {
      throw protocolError(`an answer holds a map of ${children / 2} entries`);
    }
    if (strBytes > limits.maxStrBytes) {
      throw protocolError(`an answer holds a str of ${strBytes} bytes`);
    }
    if (pos + header > bytes.length) return INCOMPLETE;
    pos += header + payload;
    if (children > 0) {
      if (outer.length + 1 > limits.maxDepth) {
        throw protocolError(`an answer nests deeper than ${limits.maxDepth}`);
      }
      outer.push(need - 1);
      need = children;
      continue;
    }
    need -= 1;
    while (need === 0) {
      if (outer.length === 0) {
        if (pos - start > limits.maxMessageBytes) {
          throw protocolError(`an answer is larger than ${limits.maxMessageBytes} bytes`);
        }
        return pos > bytes.length ? INCOMPLETE : pos;
      }
      need = outer.pop()!;
    }
  }
}
