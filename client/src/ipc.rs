//! The client side of the local socket, used by chat-cli (and tests):
//! connect, say hello, then send requests and read responses.

use std::path::{Path, PathBuf};

use interprocess::local_socket::tokio::{prelude::*, Stream};
use interprocess::local_socket::{GenericFilePath, ToFsName};
use securechat_common::ipc::{IpcError, IpcRequest, IpcResponse, IPC_VERSION};
use tokio::io::{BufReader, ReadHalf, WriteHalf};

use crate::lines::{read_msg, write_msg, IoLineError};

/// Why talking to agentd failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcClientError {
    /// Nothing listens on the socket.
    #[error("agentd is not running (no socket at {0})")]
    NotRunning(PathBuf),
    /// Connecting failed for another reason.
    #[error("cannot connect to agentd at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing failed.
    #[error(transparent)]
    Line(#[from] IoLineError),
    /// agentd closed the connection without an answer.
    #[error("agentd closed the connection without answering")]
    Closed,
    /// agentd answered with an error.
    #[error("{0}")]
    Agent(IpcError),
}

/// One connection to agentd.
#[derive(Debug)]
pub struct IpcClient {
    reader: BufReader<ReadHalf<Stream>>,
    writer: WriteHalf<Stream>,
}

impl IpcClient {
    /// Connect to the socket and do the version handshake.
    pub async fn connect(socket: &Path) -> Result<Self, IpcClientError> {
        let name =
            socket
                .to_fs_name::<GenericFilePath>()
                .map_err(|source| IpcClientError::Connect {
                    path: socket.to_path_buf(),
                    source,
                })?;
        let stream = Stream::connect(name)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    IpcClientError::NotRunning(socket.to_path_buf())
                }
                _ => IpcClientError::Connect {
                    path: socket.to_path_buf(),
                    source,
                },
            })?;
        let (r, writer) = tokio::io::split(stream);
        let mut client = Self {
            reader: BufReader::new(r),
            writer,
        };
        client
            .request(&IpcRequest::Hello {
                version: IPC_VERSION,
            })
            .await?;
        Ok(client)
    }

    /// Send one request and read its answer; an error answer is `Err`.
    pub async fn request(&mut self, req: &IpcRequest) -> Result<IpcResponse, IpcClientError> {
        if let Err(e) = write_msg(&mut self.writer, req).await {
            // agentd may have refused and closed already; its reason wins.
            return match self.next().await {
                Err(IpcClientError::Agent(refusal)) => Err(IpcClientError::Agent(refusal)),
                _ => Err(e.into()),
            };
        }
        self.next().await
    }

    /// Send a request without reading an answer: the start of a streamed
    /// answer (read it with [`IpcClient::next`]), or a `MarkRead` inside an
    /// `Events` stream.
    pub async fn send(&mut self, req: &IpcRequest) -> Result<(), IpcClientError> {
        Ok(write_msg(&mut self.writer, req).await?)
    }

    /// Read the next answer (for streamed answers); an error answer is `Err`.
    pub async fn next(&mut self) -> Result<IpcResponse, IpcClientError> {
        match read_msg::<IpcResponse, _>(&mut self.reader).await? {
            None => Err(IpcClientError::Closed),
            Some(IpcResponse::Error(e)) => Err(IpcClientError::Agent(e)),
            Some(resp) => Ok(resp),
        }
    }
}
