//! A failed command: what to print (text, or the typed `--json` error) and
//! the exit status.

use securechat_client::ipc::IpcClientError;
use securechat_common::ipc::{IpcError, IpcErrorKind};

/// A failure with its typed agent error, if there is one.
pub struct Failure {
    /// What went wrong, with its context.
    pub error: anyhow::Error,
    /// agentd's typed error (or one typed the same way), for `--json`.
    pub agent: Option<Box<IpcError>>,
    /// The `--json` error object, when it is not the agent's error.
    pub json: Option<serde_json::Value>,
    /// The exit status.
    pub exit: u8,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let agent = match error.downcast_ref::<IpcClientError>() {
            Some(IpcClientError::Agent(e)) => Some(Box::new(e.clone())),
            _ => None,
        };
        Self {
            error,
            agent,
            json: None,
            exit: 1,
        }
    }
}

impl Failure {
    /// A refusal decided before anything was asked or sent, typed as agentd
    /// would have typed it.
    pub fn refuse(kind: IpcErrorKind, message: impl Into<String>) -> Self {
        let e = IpcError::new(kind, message);
        Self {
            error: anyhow::anyhow!(e.message.clone()),
            agent: Some(Box::new(e)),
            json: None,
            exit: 1,
        }
    }

    /// agentd's refusal, as it typed it (the message may be reworded).
    pub fn agent(e: IpcError) -> Self {
        Self {
            error: anyhow::anyhow!(e.message.clone()),
            agent: Some(Box::new(e)),
            json: None,
            exit: 1,
        }
    }

    /// A send stopped by Ctrl-C: `kind` is `cancelled` or `interrupted`.
    pub fn interrupted(kind: &str, id: &str, message: String) -> Self {
        Self {
            json: Some(serde_json::json!({ "kind": kind, "id": id, "message": message })),
            error: anyhow::anyhow!(message),
            agent: None,
            // As a shell reports a command ended by SIGINT.
            exit: 130,
        }
    }
}
