// Typed errors. Every failure a caller can act on carries a code; bad arguments also name the
// argument, the shape it had and what was expected.

/** What went wrong, for code that handles errors by kind. */
export type ErrorCode =
  | "invalid_argument" // a tensor or option is malformed (ArgumentError)
  | "no_backend" //       no loaded backend supports the problem; the message lists every reason
  | "backend_rejected" // the backend forced by option or MOEFFI_BACKEND does not support the problem
  | "unknown_backend" //  a forced or disabled name matches no loaded backend
  | "backend_failed" //   a backend returned an error status from prepare or run
  | "device_error" //     a CUDA call failed, or a kernel found invalid device data (reported at the next sync)
  | "disposed"; //        the object was used after dispose()

/** Every error moeffi raises on purpose; `code` says which kind. */
export class MoeffiError extends Error {
  /** "MoeffiError" */
  override name = "MoeffiError";
  /**
   * An error of one kind.
   * @param code the kind of failure
   * @param message what happened, with the values involved
   */
  constructor(readonly code: ErrorCode, message: string) {
    super(message);
  }
}

/** A malformed argument, raised before any native call (code "invalid_argument"). */
export class ArgumentError extends MoeffiError {
  /** "ArgumentError" */
  override name = "ArgumentError";
  /**
   * Says which argument was wrong and what was expected.
   * @param argument the argument's name
   * @param shape its shape, when it is a tensor
   * @param expected what it should have been
   * @param detail what it was instead
   */
  constructor(
    readonly argument: string,
    readonly shape: readonly number[] | undefined,
    readonly expected: string,
    detail?: string,
  ) {
    const got = shape === undefined ? "" : ` (shape [${shape.join(", ")}])`;
    super("invalid_argument", `${argument}${got}: expected ${expected}${detail ? `; ${detail}` : ""}`);
  }
}
