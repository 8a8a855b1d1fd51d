import { createConnection, type Socket } from "node:net";
import { Decoder } from "@msgpack/msgpack";
import { HsmError } from "./errors.js";
import { frameEnd, type FrameLimits } from "./framing.js";

/**
 * Why an attempt failed, and whether its request may have reached the agent. The retry rules
 * (client.ts) need both: a request that certainly never left may be sent again whatever it
 * does; one that may have arrived only if doing it twice is harmless.
 */
export class AttemptFailure extends Error {
  constructor(
    readonly error: HsmError,
    readonly maybeSent: boolean,
    /** Do not try again before this time (ms, performance.now()), e.g. a connect backoff. */
    readonly notBefore = 0,
  ) {
    super(error.message);
  }
}

/** What a request settles with: the result map, or the agent's error map. */
export interface Answer {
  error: unknown;
  result: unknown;
}

/** What waits for one request's answer: told exactly once, unless forgotten first. */
export interface Pending {
  /** The answer arrived. */
  answered(answer: Answer): void;
  /** The connection was lost (`AttemptFailure`, maybe sent) or closed by the client (HsmError). */
  lost(failure: HsmError | AttemptFailure): void;
}

const MSGID_LIMIT = 2 ** 32;

/**
 * One pipelined connection to the agent. Requests are written as they come (corked within one
 * tick, so a burst goes out in few writes) and answers are matched to them by msgid, in any
 * order. A connection that is lost fails every request in flight with a `connection_failed`
 * AttemptFailure marked "maybe sent"; a connection is never reused after that.
 *
 * The socket is unref'd while nothing is in flight, so an idle client does not keep the process
 * alive (a program that forgets close() still exits).
 */
export class Connection {
  readonly #socket: Socket;
  readonly #limits: FrameLimits;
  readonly #decoder: Decoder;
  readonly #pending = new Map<number, Pending>();
  #nextMsgid = 1;
  #buffered: Uint8Array | undefined;
  #closed = false;
  #corked = false;
  readonly #onClosed: (connection: Connection) => void;

  private constructor(socket: Socket, limits: FrameLimits, onClosed: (c: Connection) => void) {
    this.#socket = socket;
    this.#limits = limits;
    this.#onClosed = onClosed;
    this.#decoder = new Decoder({
      maxStrLength: limits.maxStrBytes,
      maxBinLength: limits.maxMessageBytes,
      maxArrayLength: limits.maxArrayItems,
      maxMapLength: limits.maxMapEntries,
      maxExtLength: 0,
    });
    socket.on("data", (chunk: Buffer) => this.#onData(chunk));
    socket.on("error", () => {}); // 'close' follows and does the work
    socket.on("close", () =>
      this.#fail(new HsmError("connection_failed", "the connection to the agent was lost"), true),
    );
    socket.unref();
  }

  /**
   * Connects to `path`. Rejects with a `connection_failed` HsmError when the agent is not there,
   * or with the signal's reason when `signal` fires first (a connect that hangs).
   */
  static open(
    path: string,
    limits: FrameLimits,
    signal: AbortSignal,
    onClosed: (c: Connection) => void,
  ): Promise<Connection> {
    return new Promise((resolve, reject) => {
      const socket = createConnection({ path });
      const onAbort = () => {
        socket.destroy();
        reject(signal.reason);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      socket.once("connect", () => {
        signal.removeEventListener("abort", onAbort);
        socket.removeAllListeners("error");
        resolve(new Connection(socket, limits, onClosed));
      });
      socket.once("error", (err: NodeJS.ErrnoException) => {
        signal.removeEventListener("abort", onAbort);
        socket.destroy();
        reject(
          new HsmError(
            "connection_failed",
            `cannot connect to the agent at ${path}: ${err.code ?? err.message}`,
            {
              cause: err,
            },
          ),
        );
      });
    });
  }

  get closed(): boolean {
    return this.#closed;
  }

  /** Requests sent and not yet answered, timed out or aborted. */
  get inFlight(): number {
    return this.#pending.size;
  }

  /** A msgid not in use on this connection (a wrapping counter, as the protocol suggests). */
  nextMsgid(): number {
    for (;;) {
      const msgid = this.#nextMsgid;
      this.#nextMsgid = (this.#nextMsgid + 1) % MSGID_LIMIT;
      if (!this.#pending.has(msgid)) return msgid;
    }
  }

  /**
   * Writes one encoded request whose msgid is `msgid`; `pending` is told its answer. Returns
   * false, sending nothing, when the connection is already closed.
   */
  send(msgid: number, bytes: Uint8Array, pending: Pending): boolean {
    if (this.#closed) return false;
    this.#pending.set(msgid, pending);
    if (this.#pending.size === 1) this.#socket.ref();
    if (!this.#corked) {
      // Requests made in the same tick leave in one write.
      this.#corked = true;
      this.#socket.cork();
      process.nextTick(() => {
        this.#corked = false;
        this.#socket.uncork();
      });
    }
    this.#socket.write(bytes);
    return true;
  }

  /** Stops waiting for `msgid` (its call timed out or was aborted); a late answer is dropped. */
  forget(msgid: number): void {
    if (this.#pending.delete(msgid)) this.#idleCheck();
  }

  /** Closes the connection; requests in flight fail with `error`, final (not retried). */
  close(error: HsmError): void {
    this.#fail(error, false);
  }

  #idleCheck(): void {
    if (this.#pending.size === 0 && !this.#closed) this.#socket.unref();
  }

  #fail(error: HsmError, retryable: boolean): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#socket.destroy();
    this.#buffered = undefined;
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    this.#onClosed(this);
    const failure = retryable ? new AttemptFailure(error, true) : error;
    for (const entry of pending) entry.lost(failure);
  }

  #onData(chunk: Buffer): void {
    let bytes: Uint8Array = chunk;
    if (this.#buffered !== undefined) {
      const joined = new Uint8Array(this.#buffered.length + chunk.length);
      joined.set(this.#buffered);
      joined.set(chunk, this.#buffered.length);
      bytes = joined;
      this.#buffered = undefined;
    }
    let start = 0;
    try {
      while (start < bytes.length) {
        const end = frameEnd(bytes, start, this.#limits);
        if (end < 0) break;
        // A copy: results hold views into it, not into the read buffer (which holds others).
        this.#dispatch(this.#decoder.decode(Uint8Array.prototype.slice.call(bytes, start, end)));
        if (this.#closed) return;
        start = end;
      }
    } catch (err) {
      const error =
        err instanceof HsmError
          ? err
          : new HsmError("protocol_error", `cannot decode an answer: ${String(err)}`);
      this.#fail(error, false);
      return;
    }
    if (start < bytes.length) this.#buffered = bytes.subarray(start);
  }

  #dispatch(message: unknown): void {
    if (
      !Array.isArray(message) ||
      message.length !== 4 ||
      message[0] !== 1 ||
      typeof message[1] !== "number"
    ) {
      throw new HsmError("protocol_error", "the agent sent something other than a response");
    }
    const [, msgid, error, result] = message as [number, number, unknown, unknown];
    const entry = this.#pending.get(msgid);
    if (entry === undefined) return; // its call timed out or was aborted
    this.#pending.delete(msgid);
    this.#idleCheck();
    entry.answered({ error, result });
  }
}
