/**
 * A request the service refuses. `name` and `status` are what p2pd's control API answers (HTTP status, the
 * error's name in the JSON body) and what p2p-mount acts on (`MountGone`, `MountBusy`, `Forbidden`): stable.
 */
export interface Refusal extends Error {
  status: number
  hint?: string
}

export function refusal(name: string, status: number, message: string, hint?: string): Refusal {
  return Object.assign(new Error(message), { name, status, ...(hint !== undefined && { hint }) })
}
