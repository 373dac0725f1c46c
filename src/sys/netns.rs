//! Named network namespaces, the way iproute2 keeps them (an nsfs bind mount under
//! /run/netns), and the one OS thread that may switch namespaces. Namespace switches are
//! per thread, so they never happen on a tokio worker: every job runs on [`NetnsWorker`]'s
//! own thread, which always returns to the host namespace before it takes the next job.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use tokio::sync::{mpsc, oneshot};

/// Where iproute2 (and so `ip netns list`) keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// What a job on the namespace thread may use.
pub struct Ctx {
    /// The host's network namespace, to return to.
    host_ns: File,
    /// A netlink route connection in the host namespace.
    pub host: rtnetlink::Handle,
    /// /run/netns is known to be a shared mount point. Checked once: re-marking it walks
    /// every namespace mount below it, which made each create cost more than the last.
    netns_dir_shared: std::cell::Cell<bool>,
    /// This host's id: part of what makes router MACs differ between hosts.
    pub host_id: String,
}

type Job = Box<dyn FnOnce(Rc<Ctx>) -> Pin<Box<dyn Future<Output = ()>>> + Send>;

/// Handle to the namespace thread. Jobs run one at a time, in order.
#[derive(Clone)]
pub struct NetnsWorker {
    tx: mpsc::UnboundedSender<Job>,
}

impl NetnsWorker {
    /// Starts the thread (with its own single-threaded runtime) in the caller's namespace.
    pub fn start(host_id: &str) -> io::Result<NetnsWorker> {
        let host_id = host_id.to_string();
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("rampart-netns".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                join_host_mounts();
                let ctx = rt.block_on(async {
                    let host_ns = File::open("/proc/thread-self/ns/net")?;
                    let (conn, host, _) = rtnetlink::new_connection()?;
                    tokio::spawn(conn);
                    Ok::<_, io::Error>(Rc::new(Ctx {
                        host_ns,
                        host,
                        netns_dir_shared: std::cell::Cell::new(false),
                        host_id,
                    }))
                });
                let ctx = match ctx {
                    Ok(ctx) => {
                        let _ = ready_tx.send(Ok(()));
                        ctx
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        job(ctx.clone()).await;
                    }
                });
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("namespace thread ended at start"))??;
        Ok(NetnsWorker { tx })
    }

    /// Runs `f` on the namespace thread and waits for its result.
    pub async fn run<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Rc<Ctx>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |ctx| {
            Box::pin(async move {
                let _ = tx.send(f(ctx).await);
            })
        });
        if self.tx.send(job).is_err() {
            panic!("the namespace thread has ended");
        }
        rx.await.expect("namespace job dropped its result")
    }
}

impl Ctx {
    /// A netlink connection inside `ns`. The socket keeps its namespace for life, so the
    /// thread only visits `ns` for the moment the socket is made.
    pub fn handle_in(&self, ns: &File) -> io::Result<rtnetlink::Handle> {
        self.with_ns(ns, || {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok(handle)
        })
    }

    /// Runs `f` with this thread inside `ns`, then returns to the host namespace.
    pub fn with_ns<T>(&self, ns: &File, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        setns(ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let result = f();
        self.back_home();
        result
    }

    fn back_home(&self) {
        // A thread left in a router's namespace would configure the wrong host: fatal.
        if let Err(e) = setns(&self.host_ns, CloneFlags::CLONE_NEWNET) {
            panic!("cannot return to the host network namespace: {e}");
        }
    }

    /// Creates the named namespace `name` (bind-mounted like `ip netns add`) and runs `f`
    /// inside it; returns the namespace's file. On any error nothing is left behind.
    pub fn create_ns<T>(
        &self,
        name: &str,
        f: impl FnOnce() -> io::Result<T>,
    ) -> io::Result<(File, T)> {
        std::fs::create_dir_all(NETNS_DIR)?;
        if !self.netns_dir_shared.get() {
            ensure_netns_dir()?;
            self.netns_dir_shared.set(true);
        }
        let path = ns_path(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)?;
        let made = (|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let result = (|| {
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(io::Error::from)?;
                f()
            })();
            self.back_home();
            let value = result?;
            Ok((File::open(&path)?, value))
        })();
        if made.is_err() {
            let _ = remove_ns(name);
        }
        made
    }
}

/// Moves this thread into the mount namespace of PID 1. Named namespaces are bind mounts:
/// made from a private mount namespace (systemd's ProtectSystem, `ip netns exec`) they
/// would be invisible to the host, so `ip netns` and the host's tools could not enter them.
/// Joining a mount namespace needs a thread with its own filesystem attributes first.
fn join_host_mounts() {
    let joined = (|| -> io::Result<bool> {
        let init = File::open("/proc/1/ns/mnt")?;
        let own = std::fs::metadata("/proc/thread-self/ns/mnt")?;
        let init_meta = init.metadata()?;
        use std::os::unix::fs::MetadataExt;
        if (own.dev(), own.ino()) == (init_meta.dev(), init_meta.ino()) {
            return Ok(false);
        }
        unshare(CloneFlags::CLONE_FS).map_err(io::Error::from)?;
        setns(&init, CloneFlags::CLONE_NEWNS).map_err(io::Error::from)?;
        Ok(true)
    })();
    match joined {
        Ok(true) => tracing::info!("namespace thread joined the host's mount namespace"),
        Ok(false) => {}
        Err(e) => tracing::warn!(
            error = %e,
            "cannot join the host's mount namespace; router namespaces may be invisible outside the agent"
        ),
    }
}

/// Where `ip netns` keeps namespace `name` (`/run/netns/<name>`).
pub fn ns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Makes /run/netns a shared mount point as iproute2 does, so namespaces made here are
/// seen (and can be entered) from every mount namespace, the host's included.
fn ensure_netns_dir() -> io::Result<()> {
    let shared = || {
        mount(
            None::<&str>,
            NETNS_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                Some("none"),
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(io::Error::from)?;
            shared().map_err(io::Error::from)
        }
        Err(e) => Err(e.into()),
    }
}

/// The named namespace, if `/run/netns/<name>` is a live namespace (not a stale file).
pub fn open_ns(name: &str) -> io::Result<Option<File>> {
    let file = match File::open(ns_path(name)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let fs = nix::sys::statfs::fstatfs(&file).map_err(io::Error::from)?;
    Ok((fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC).then_some(file))
}

/// Unmounts and removes a named namespace; absent is fine. The namespace itself goes when
/// its last user does.
pub fn remove_ns(name: &str) -> io::Result<()> {
    let path = ns_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Names under /run/netns starting with `prefix`.
pub fn list_ns(prefix: &str) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        if let Some(name) = entry?.file_name().to_str()
            && name.starts_with(prefix)
        {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Writes a sysctl of the calling thread's network namespace.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(sysctl_path(key), value)
}

/// The value of sysctl `key` (`net.ipv4.ip_forward`) in the calling thread's namespace.
pub fn read_sysctl(key: &str) -> io::Result<String> {
    Ok(std::fs::read_to_string(sysctl_path(key))?
        .trim()
        .to_string())
}

fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}
