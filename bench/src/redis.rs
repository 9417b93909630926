//! The yardstick: redis-server with `appendfsync always` (every write on
//! disk before the reply, as the relay's `Stored` is), driven by
//! redis-benchmark with LPUSH of values as large as the relay's envelopes,
//! at the same concurrency.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::target::on_path;

/// A redis-server the bench started in a temporary directory.
pub struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// What redis-benchmark measured.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RedisResult {
    /// Requests per second.
    pub msgs_per_s: f64,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
}

impl Redis {
    /// Start `redis-server` (from PATH) on a free loopback port.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = tool("redis-server")?;
        let dir = tempfile::Builder::new()
            .prefix("securechat-bench-redis.")
            .tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server")?;
        let redis = Self {
            child,
            port,
            _dir: dir,
        };
        redis.wait_ready().await?;
        Ok(redis)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                s.write_all(b"PING\r\n").await?;
                let mut buf = [0u8; 7];
                if s.read_exact(&mut buf).await.is_ok() && &buf == b"+PONG\r\n" {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("redis-server did not answer PING within 10 s")
    }

    /// `redis-benchmark -t lpush` with `clients` connections, `pipeline`
    /// requests in flight on each, `requests` in all, values of `size`
    /// bytes.
    pub async fn lpush(
        &self,
        clients: usize,
        pipeline: usize,
        requests: usize,
        size: usize,
    ) -> anyhow::Result<RedisResult> {
        let bin = tool("redis-benchmark")?;
        let out = Command::new(bin)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", "lpush", "--csv"])
            .args(["-c", &clients.to_string()])
            .args(["-P", &pipeline.to_string()])
            .args(["-n", &requests.to_string()])
            .args(["-d", &size.to_string()])
            .stdin(Stdio::null())
            .output()
            .await
            .context("running redis-benchmark")?;
        if !out.status.success() {
            bail!(
                "redis-benchmark failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_csv(&String::from_utf8_lossy(&out.stdout))
    }

    /// Stop the server.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// redis-benchmark's `--csv` output: a header line, then one line per test.
fn parse_csv(text: &str) -> anyhow::Result<RedisResult> {
    let rows: Vec<Vec<String>> = text
        .lines()
        .filter(|l| l.starts_with('"'))
        .map(|l| {
            l.split(',')
                .map(|f| f.trim_matches('"').to_string())
                .collect()
        })
        .collect();
    let header = rows
        .iter()
        .find(|r| r.first().is_some_and(|f| f == "test"))
        .context("redis-benchmark printed no CSV header")?;
    let row = rows
        .iter()
        .find(|r| r.first().is_some_and(|f| f == "LPUSH"))
        .context("redis-benchmark printed no LPUSH line")?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let i = header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("redis-benchmark's CSV has no {name} column"))?;
        row.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("redis-benchmark's {name} is not a number"))
    };
    Ok(RedisResult {
        msgs_per_s: field("rps")?,
        p50_ms: field("p50_latency_ms")?,
        p99_ms: field("p99_latency_ms")?,
    })
}

fn tool(program: &str) -> anyhow::Result<PathBuf> {
    on_path(program).with_context(|| {
        format!(
            "{program} is not on PATH; install Redis (Debian: `apt-get install redis-server \
             redis-tools`) or leave out --compare-redis"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redis_benchmark_csv() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\
                    \"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"LPUSH\",\"1663.89\",\"0.595\",\"0.280\",\"0.575\",\"0.775\",\"1.063\",\"3.543\"\n";
        let r = parse_csv(text).expect("parses");
        assert_eq!(r.msgs_per_s, 1663.89);
        assert_eq!(r.p50_ms, 0.575);
        assert_eq!(r.p99_ms, 1.063);
        assert!(parse_csv("").is_err());
    }
}
