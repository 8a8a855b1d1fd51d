import type { AttemptFailure, Answer, Connection, Pending } from "./connection.js";
import { HsmError } from "./errors.js";

/**
 * One call from start to its single completion (hsm::client's Call): its deadline, its
 * attempts, where it is in flight, and the timers it holds. `finish` is the one place a call
 * completes: it clears the deadline and retry timers, forgets the request on its connection,
 * drops the caller's abort listener, and settles the promise. Everything after it is a no-op.
 */
export class Call implements Pending {
  attempts = 0;
  /** The last attempt's failure while waiting to retry (reported if the deadline comes first). */
  lastFailure: HsmError | undefined;
  retryTimer: ReturnType<typeof setTimeout> | undefined;
  inFlight: { connection: Connection; msgid: number } | undefined;
  #done = false;
  #deadlineTimer: ReturnType<typeof setTimeout>;
  #signal: AbortSignal | undefined;
  #onAbort: (() => void) | undefined;

  constructor(
    readonly method: string,
    readonly params: Record<string, unknown>,
    readonly idempotent: boolean,
    readonly maxAttempts: number,
    readonly deadline: number,
    timeoutMs: number,
    signal: AbortSignal | undefined,
    private readonly resolve: (result: Record<string, unknown>) => void,
    private readonly reject: (error: HsmError) => void,
    /** Told the answer or the lost connection of the attempt in flight. */
    private readonly onAttempt: (call: Call, outcome: Answer | AttemptFailure | HsmError) => void,
    private readonly onFinish: (call: Call) => void,
  ) {
    this.#deadlineTimer = setTimeout(() => {
      // With no request on the wire (waiting to retry, or to connect again), the last failure
      // says more than "timeout"; with one out, "timeout" is what happened.
      const cause = this.inFlight === undefined ? this.lastFailure : undefined;
      this.finish(
        cause ??
          new HsmError(
            "timeout",
            `${method}: no answer within ${timeoutMs} ms (the agent may be overloaded or the HSM slow)`,
          ),
      );
    }, timeoutMs);
    if (signal !== undefined) {
      this.#signal = signal;
      this.#onAbort = () =>
        this.finish(new HsmError("aborted", `${method}: aborted`, { cause: signal.reason }));
      signal.addEventListener("abort", this.#onAbort, { once: true });
    }
  }

  get done(): boolean {
    return this.#done;
  }

  answered(answer: Answer): void {
    this.inFlight = undefined;
    if (!this.#done) this.onAttempt(this, answer);
  }

  lost(failure: HsmError | AttemptFailure): void {
    this.inFlight = undefined;
    if (!this.#done) this.onAttempt(this, failure);
  }

  finish(outcome: Record<string, unknown> | HsmError): void {
    if (this.#done) return;
    this.#done = true;
    clearTimeout(this.#deadlineTimer);
    if (this.retryTimer !== undefined) clearTimeout(this.retryTimer);
    if (this.inFlight !== undefined) this.inFlight.connection.forget(this.inFlight.msgid);
    this.inFlight = undefined;
    if (this.#onAbort !== undefined) this.#signal!.removeEventListener("abort", this.#onAbort);
    this.onFinish(this);
    if (outcome instanceof HsmError) this.reject(outcome);
    else this.resolve(outcome);
  }
}
