export {
  HsmClient,
  DEFAULT_SOCKET,
  type HsmClientOptions,
  type SignBatchResult,
} from "./client.js";
export {
  HsmError,
  type HsmErrorCode,
  type ProtocolErrorCode,
  type ClientErrorCode,
  type JoseErrorCode,
} from "./errors.js";
export * from "./types.js";
export { base64url } from "./compact.js";
export { agentJwks, type AgentJwks, type AgentJwksOptions } from "./jwks.js";
export { SidecarKmsAdapter, NotImplementedError, type SidecarAdapterConfig } from "./adapter.js";
export * from "./kms-types.js";
