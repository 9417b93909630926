//! Reaching agentd over its local socket: finding the socket, connecting
//! (a request/answer [`IpcClient`], or a [`Duplex`] connection for streams
//! that are read and written at once).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use interprocess::local_socket::tokio::{prelude::*, Stream};
use interprocess::local_socket::{GenericFilePath, ToFsName};
use securechat_client::ipc::{IpcClient, IpcClientError};
use securechat_client::lines::{read_msg, write_msg};
use securechat_client::Paths;
use securechat_common::ipc::{IpcRequest, IpcResponse, IPC_VERSION, MAX_MARK_READ};
use tokio::io::{BufReader, ReadHalf, WriteHalf};

/// Where agentd's socket may be: `SECURECHAT_SOCKET` if set, else the
/// places agentd may have put it (see `paths::socket_candidates`: a shell
/// without `XDG_RUNTIME_DIR` still finds the service's socket, and the
/// other way round).
fn candidates(paths: &Paths) -> Result<Vec<PathBuf>> {
    let socket = std::env::var_os(securechat_client::paths::SOCKET_ENV)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let default_home = Paths::resolve(None).ok().map(|p| p.home);
    let home = (default_home.as_ref() != Some(&paths.home)).then(|| paths.home.clone());
    Ok(securechat_client::paths::socket_candidates(home, socket)?)
}

/// Connect to the first candidate socket that answers; when none does,
/// the error says how to start agentd.
pub async fn connect(paths: &Paths) -> Result<IpcClient> {
    let candidates = candidates(paths)?;
    for sock in &candidates {
        match IpcClient::connect(sock).await {
            Ok(c) => return Ok(c),
            Err(IpcClientError::NotRunning(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "agentd is not running (no socket at {}).\nStart it with:\n  agentd --home {} \
         --relay HOST:PORT --relay-fingerprint SHA256\nor, as a service:\n  systemctl --user \
         start securechat-agentd",
        tried.join(", "),
        paths.home.display()
    )
}

/// Connect again after agentd went away: typed, so that the caller can
/// tell "still away" ([`is_gone`]) from a refusal.
pub async fn reconnect(paths: &Paths) -> Result<IpcClient, IpcClientError> {
    let candidates = candidates(paths).map_err(|_| IpcClientError::Closed)?;
    let mut last = IpcClientError::Closed;
    for sock in &candidates {
        match IpcClient::connect(sock).await {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Mark messages read, in requests of at most [`MAX_MARK_READ`] ids.
pub async fn mark_read(client: &mut IpcClient, ids: Vec<String>) -> Result<(), IpcClientError> {
    for chunk in ids.chunks(MAX_MARK_READ) {
        client
            .request(&IpcRequest::MarkRead {
                ids: chunk.to_vec(),
            })
            .await?;
    }
    Ok(())
}

/// The reading half of a [`Duplex`] connection.
pub type Reader = BufReader<ReadHalf<Stream>>;

/// The writing half of a [`Duplex`] connection.
pub type Writer = WriteHalf<Stream>;

/// A connection whose two directions are used independently: one task
/// reads a stream (never cancelled half way through a line) while another
/// writes `MarkRead` lines into it.
pub struct Duplex {
    /// agentd's answers.
    pub reader: Reader,
    /// Our requests.
    pub writer: Writer,
}

impl Duplex {
    /// Connect to the first candidate socket that answers and say hello.
    pub async fn open(paths: &Paths) -> Result<Self, IpcClientError> {
        let candidates = candidates(paths).map_err(|_| IpcClientError::Closed)?;
        let mut last = IpcClientError::Closed;
        for sock in &candidates {
            match Self::open_at(sock).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn open_at(socket: &Path) -> Result<Self, IpcClientError> {
        let failed = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                IpcClientError::NotRunning(socket.to_path_buf())
            }
            _ => IpcClientError::Connect {
                path: socket.to_path_buf(),
                source,
            },
        };
        let name = socket.to_fs_name::<GenericFilePath>().map_err(failed)?;
        let stream = Stream::connect(name).await.map_err(failed)?;
        let (r, writer) = tokio::io::split(stream);
        let mut conn = Self {
            reader: BufReader::new(r),
            writer,
        };
        conn.send(&IpcRequest::Hello {
            version: IPC_VERSION,
        })
        .await?;
        conn.next().await?;
        Ok(conn)
    }

    /// Write one request line.
    pub async fn send(&mut self, req: &IpcRequest) -> Result<(), IpcClientError> {
        Ok(write_msg(&mut self.writer, req).await?)
    }

    /// Read the next answer; an error answer is `Err`.
    pub async fn next(&mut self) -> Result<IpcResponse, IpcClientError> {
        next(&mut self.reader).await
    }
}

/// Read the next answer from the reading half of a [`Duplex`].
pub async fn next(reader: &mut Reader) -> Result<IpcResponse, IpcClientError> {
    match read_msg::<IpcResponse, _>(reader).await? {
        None => Err(IpcClientError::Closed),
        Some(IpcResponse::Error(e)) => Err(IpcClientError::Agent(e)),
        Some(resp) => Ok(resp),
    }
}
