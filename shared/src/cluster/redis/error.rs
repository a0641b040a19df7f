//! How redis-rs errors become [`ClusterError`]s.

use redis::{RedisError, RetryMethod};

use crate::cluster::ClusterError;

/// Classifies a Redis error: timeouts and connection or topology trouble are retryable,
/// anything Redis refuses outright means our data or scripts do not fit the server.
pub(crate) fn classify(err: &RedisError, key: &str) -> ClusterError {
    if err.is_timeout() {
        return ClusterError::Timeout(format!("{key}: {err}"));
    }
    match err.retry_method() {
        RetryMethod::NoRetry => ClusterError::Corrupt {
            key: key.to_owned(),
            reason: err.to_string(),
        },
        _ => ClusterError::Unavailable(format!("{key}: {err}")),
    }
}

/// A decoding failure of data stored at `key`.
pub(crate) fn corrupt(key: &str, reason: impl std::fmt::Display) -> ClusterError {
    ClusterError::Corrupt {
        key: key.to_owned(),
        reason: reason.to_string(),
    }
}
