//! Bounded JSON-line I/O over the local socket, shared by agentd's server
//! and chat-cli's client.

use securechat_common::ipc::{decode_line, encode_line, LineError, MAX_LINE_LEN};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a line could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoLineError {
    /// The socket failed.
    #[error("local socket: {0}")]
    Io(#[from] std::io::Error),
    /// The line is too long or not valid JSON.
    #[error(transparent)]
    Line(#[from] LineError),
    /// The peer hung up in the middle of a line.
    #[error("the peer hung up in the middle of a line")]
    Truncated,
}

/// Read one line of at most [`MAX_LINE_LEN`] bytes; `None` at a clean end.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, IoLineError> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE_LEN as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if !buf.ends_with(b"\n") {
        if buf.len() >= MAX_LINE_LEN {
            return Err(LineError::TooLarge(buf.len()).into());
        }
        return Err(IoLineError::Truncated);
    }
    Ok(Some(buf))
}

/// Read and decode one message; `None` at a clean end.
pub async fn read_msg<T: DeserializeOwned, R: AsyncBufRead + Unpin>(
    r: &mut R,
) -> Result<Option<T>, IoLineError> {
    match read_line(r).await? {
        None => Ok(None),
        Some(line) => Ok(Some(decode_line(&line)?)),
    }
}

/// Encode and write one message as a line.
pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &T,
) -> Result<(), IoLineError> {
    let line = encode_line(msg)?;
    w.write_all(&line).await?;
    w.flush().await?;
    Ok(())
}
