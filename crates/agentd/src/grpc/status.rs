//! Store failures as gRPC statuses, with their codes from the error table. A client's own mistakes (bad ids, missing
//! fields, unknown chats) are mapped where they are found; this maps what the client cannot fix.

use tonic::Status;

use crate::error::ErrorCode;
use crate::store::StoreError;

/// Logged here, once, with its cause; the client gets UNAVAILABLE (retryable) when the store could not be reached,
/// INTERNAL (a retry cannot help) when it refused the request, without internals either way.
pub fn from_store(error: StoreError) -> Status {
    match error {
        StoreError::ChatNotFound(_) => ErrorCode::ChatNotFound.status("chat not found"),
        error if error.is_unavailable() => {
            tracing::error!(%error, "session store unavailable");
            ErrorCode::StoreUnavailable.status("session store unavailable")
        }
        error => {
            tracing::error!(%error, "session store refused a request");
            ErrorCode::StoreRefused.status("the session store refused the request")
        }
    }
}
