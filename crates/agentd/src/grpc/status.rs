//! Store failures as gRPC statuses, with their codes from the error table. A client's own mistakes (bad ids, missing
//! fields, unknown chats) are mapped where they are found; this maps what the client cannot fix.

use tonic::Status;

use crate::error::ErrorCode;
use crate::store::StoreError;

/// Logged here, once, with its cause; the client gets UNAVAILABLE (retryable) without internals.
pub fn from_store(error: StoreError) -> Status {
    match error {
        StoreError::ChatNotFound(_) => ErrorCode::ChatNotFound.status("chat not found"),
        error => {
            tracing::error!(%error, "session store request failed");
            ErrorCode::StoreUnavailable.status("session store unavailable")
        }
    }
}
