//! The upload server's HTTP surface and upload sessions.
//!
//! A session is one attempt to fill the destination: a blocking conversion job reading from a
//! [`crate::feed`] channel, plus the bookkeeping of the bytes fed so far (offset, running
//! digest). Requests come and go; the session survives an interrupted raw body for
//! [`RESUME_WINDOW`] so the client can continue at `Upload-Offset`.
//!
//! Every request is processed in its own spawned task, so a client that disconnects (and gets
//! its handler future dropped) can never leave the state machine half-updated.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use cdi_api::TerminationMessage;
use cdi_api::termination::UPLOAD_COMPLETE;
use cdi_formats::{ConvertOptions, ConvertReport, ErrorKind, Preallocation};
use cdi_pki::serve::PeerCertificates;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::digest::{self, ExpectedDigest, Hasher};
use crate::feed::{self, EofSignal, Feed, Msg};
use crate::state::{Admission, PhaseKind, admit, offset_query};

/// How long an interrupted raw upload waits for its continuation before the conversion is
/// abandoned and the partial data removed. Long enough for a client to notice a dropped
/// connection, reconnect (possibly through a restarted proxy) and query the offset; short
/// enough that a client that gave up does not block the volume for long.
pub const RESUME_WINDOW: Duration = Duration::from_secs(5 * 60);

/// After a successful upload the server keeps answering (409 "upload already completed") for
/// this long before it exits. A client whose 200 was lost (the connection dropped after the
/// image was complete) reconnects at once and asks for the offset: it should learn that its
/// upload is done, not meet a refused connection it cannot tell from a crash. Half a second
/// covers an immediate reconnect (token request, TLS to the proxy and on to this server) on
/// the local or cluster network. It is kept short because a supervisor that waits for the
/// exit (the kubelet) sees the completion this much later; the termination message is written
/// when the grace starts, and the embedded controller reads it then (and stops the server). A
/// client that comes later gets the proxy's 503 "already finished uploading" instead.
pub const COMPLETED_GRACE: Duration = Duration::from_millis(500);

/// After the converter refused an image mid-body, or a request was refused before its body
/// was read (409 done, 503 busy, bad headers), the rest of the body is read and discarded for
/// at most this long before the error is sent: HTTP/1.1 clients that are still sending often
/// miss an answer that arrives before they finish (the connection is reset under them).
/// Bounded so a huge upload does not have to be received in full just to be refused.
pub const EARLY_ERROR_DRAIN: Duration = Duration::from_secs(5);

/// Request header carrying the resume offset (also answered by the offset query and on
/// interruption). Same name and meaning as in the tus protocol: bytes of the body already
/// received.
pub const UPLOAD_OFFSET: &str = "upload-offset";
/// Request header with the integrity digest of the whole body (RFC 9530).
pub const CONTENT_DIGEST: &str = "content-digest";
/// Upstream's content-type header switching to host-assisted clone handling.
pub const CDI_CONTENT_TYPE: &str = "x-cdi-content-type";

/// Upstream's message prefix for capacity failures (`400`); clients and the controller match it.
pub const CAPACITY_MESSAGE: &str =
    "Saving stream failed: effective image size is larger than the reported available storage";

/// What the server needs to know about its destination.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DESTINATION`: image file or block device.
    pub destination: PathBuf,
    /// `UPLOAD_IMAGE_SIZE` in bytes.
    pub image_size: Option<u64>,
    /// `FILESYSTEM_OVERHEAD` fraction.
    pub overhead: f64,
    /// `PREALLOCATION`.
    pub preallocation: bool,
    /// `CDI_SCRATCH_DIR`, when a scratch directory exists.
    pub scratch_dir: Option<PathBuf>,
    /// `CLIENT_NAME`: required client-certificate common name.
    pub client_name: String,
    /// How long an interrupted upload may be resumed ([`RESUME_WINDOW`] unless overridden).
    pub resume_window: Duration,
}

/// How the server's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Still serving.
    Running,
    /// The image is complete; exit 0 with this termination message.
    Completed(TerminationMessage),
    /// Background processing of an async upload failed; exit non-zero with this line.
    Failed(String),
}

/// Which upload endpoint a request hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Answer only after the image is converted and synced.
    pub sync: bool,
    /// multipart/form-data body with a `file` part.
    pub form: bool,
    /// Archive (tar) content rather than a disk image.
    pub archive: bool,
}

impl Endpoint {
    const UPLOAD: Endpoint = Endpoint {
        sync: true,
        form: false,
        archive: false,
    };
    const ASYNC: Endpoint = Endpoint {
        sync: false,
        form: false,
        archive: false,
    };
    const FORM: Endpoint = Endpoint {
        sync: true,
        form: true,
        archive: false,
    };
    const FORM_ASYNC: Endpoint = Endpoint {
        sync: false,
        form: true,
        archive: false,
    };
    const ARCHIVE: Endpoint = Endpoint {
        sync: true,
        form: false,
        archive: true,
    };

    fn resumable(self) -> bool {
        !self.form && !self.archive
    }
}

/// The paths upstream serves, per API version, with their endpoint.
pub const ENDPOINTS: [(&str, Endpoint); 5] = [
    ("upload", Endpoint::UPLOAD),
    ("upload-async", Endpoint::ASYNC),
    ("upload-form", Endpoint::FORM),
    ("upload-form-async", Endpoint::FORM_ASYNC),
    ("upload-archive", Endpoint::ARCHIVE),
];

/// The offset-query path (ours), per API version.
pub const OFFSET_PATH: &str = "upload-offset";

struct Session {
    id: u64,
    feed: Feed,
    job: JoinHandle<Result<ConvertReport, cdi_formats::Error>>,
    offset: u64,
    expected: Option<ExpectedDigest>,
    hasher: Option<Hasher>,
}

enum Phase {
    Idle,
    Receiving,
    Interrupted(Box<Session>),
    Finishing,
    Done,
    Closing,
}

impl Phase {
    fn kind(&self) -> PhaseKind {
        match self {
            Phase::Idle => PhaseKind::Idle,
            Phase::Receiving => PhaseKind::Receiving,
            Phase::Interrupted(s) => PhaseKind::Interrupted { offset: s.offset },
            Phase::Finishing => PhaseKind::Finishing,
            Phase::Done => PhaseKind::Done,
            Phase::Closing => PhaseKind::Closing,
        }
    }
}

struct Inner {
    phase: Phase,
    next_id: u64,
}

/// One upload server: settings, state and the outcome channel its runner watches.
pub struct UploadServer {
    settings: Settings,
    inner: Mutex<Inner>,
    outcome: watch::Sender<Outcome>,
}

impl std::fmt::Debug for UploadServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadServer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

enum PumpEnd {
    Complete,
    BodyError(String),
    ConverterGone,
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    let mut resp = (status, message.into()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn with_offset(mut resp: Response, offset: u64) -> Response {
    resp.headers_mut()
        .insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    resp
}

/// Status and body for a failed conversion: upstream's 400 for capacity, 500 otherwise.
pub fn failure_response(err: &cdi_formats::Error) -> (StatusCode, String) {
    match err.kind() {
        ErrorKind::TargetTooSmall | ErrorKind::NoSpace => (
            StatusCode::BAD_REQUEST,
            format!("{CAPACITY_MESSAGE}: {err}"),
        ),
        ErrorKind::Truncated | ErrorKind::Io => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Saving stream failed: failed to pull image: {err}"),
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Saving stream failed: {err}"),
        ),
    }
}

impl UploadServer {
    /// A server in the idle state.
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(UploadServer {
            settings,
            inner: Mutex::new(Inner {
                phase: Phase::Idle,
                next_id: 1,
            }),
            outcome: watch::channel(Outcome::Running).0,
        })
    }

    /// Watch the outcome (the runner stops serving once it leaves `Running`).
    pub fn outcome(&self) -> watch::Receiver<Outcome> {
        self.outcome.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would be a bug in a few lines of bookkeeping; keep
        // serving with whatever state was there rather than poisoning every later request.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_phase(&self, phase: Phase) {
        self.lock().phase = phase;
    }

    /// Deadline reached: refuse new uploads, wait for one in flight, abandon an interrupted
    /// one. Returns once nothing runs any more.
    pub async fn close(self: &Arc<Self>) {
        /// How often closing re-checks a busy server.
        const POLL: Duration = Duration::from_millis(200);
        enum Next {
            Wait,
            Discard(Box<Session>),
            Stop,
        }
        loop {
            let next = {
                let mut g = self.lock();
                match std::mem::replace(&mut g.phase, Phase::Closing) {
                    Phase::Idle | Phase::Closing => Next::Stop,
                    Phase::Done => {
                        g.phase = Phase::Done;
                        Next::Stop
                    }
                    Phase::Interrupted(s) => Next::Discard(s),
                    busy @ (Phase::Receiving | Phase::Finishing) => {
                        g.phase = busy;
                        Next::Wait
                    }
                }
            };
            match next {
                Next::Wait => tokio::time::sleep(POLL).await,
                Next::Discard(s) => return self.discard(*s).await,
                Next::Stop => return,
            }
        }
    }

    /// The axum router: upload endpoints under `/v1beta1/` and `/v1alpha1/`, the offset
    /// query, and `/healthz`.
    pub fn router(self: &Arc<Self>) -> Router {
        let mut router = Router::new().route("/healthz", get(|| async { "OK" }));
        for version in ["v1beta1", "v1alpha1"] {
            for (name, endpoint) in ENDPOINTS {
                router = router.route(
                    &format!("/{version}/{name}"),
                    any(
                        move |State(srv): State<Arc<UploadServer>>, req: Request| async move {
                            srv.handle(endpoint, req).await
                        },
                    ),
                );
            }
            router = router.route(
                &format!("/{version}/{OFFSET_PATH}"),
                any(
                    |State(srv): State<Arc<UploadServer>>, req: Request| async move {
                        srv.handle_offset(req)
                    },
                ),
            );
        }
        router.with_state(self.clone())
    }

    fn authorized(&self, req: &Request) -> bool {
        req.extensions()
            .get::<PeerCertificates>()
            .is_some_and(|p| p.common_names().contains(&self.settings.client_name))
    }

    fn handle_offset(&self, req: Request) -> Response {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return StatusCode::NOT_FOUND.into_response();
        }
        if !self.authorized(&req) {
            return text(StatusCode::UNAUTHORIZED, "client certificate required");
        }
        let answer = offset_query(self.lock().phase.kind());
        match answer {
            Ok(offset) => with_offset(text(StatusCode::OK, offset.to_string()), offset),
            Err((status, reason)) => text(status, reason),
        }
    }

    async fn handle(self: Arc<Self>, endpoint: Endpoint, req: Request) -> Response {
        // Upstream: HEAD on the async paths is an unauthenticated capability probe.
        if req.method() == Method::HEAD && !endpoint.sync {
            return StatusCode::OK.into_response();
        }
        if req.method() != Method::POST {
            return StatusCode::NOT_FOUND.into_response();
        }
        if !self.authorized(&req) {
            return text(StatusCode::UNAUTHORIZED, "client certificate required");
        }
        let headers = req.headers().clone();
        let checked = upload_headers(&headers);
        let body = req.into_body();
        let task = tokio::spawn(async move {
            match checked {
                Ok((requested, expected)) => {
                    self.process(endpoint, headers, body, requested, expected)
                        .await
                }
                Err((status, message)) => refuse(body, text(status, message)).await,
            }
        });
        task.await.unwrap_or_else(|e| {
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("upload task failed: {e}"),
            )
        })
    }

    async fn process(
        self: Arc<Self>,
        endpoint: Endpoint,
        headers: HeaderMap,
        body: Body,
        requested: Option<u64>,
        expected: Option<ExpectedDigest>,
    ) -> Response {
        let admitted = {
            let mut g = self.lock();
            let admission = admit(g.phase.kind(), requested, endpoint.resumable());
            match &admission {
                Admission::Reject {
                    status,
                    message,
                    offset,
                } => {
                    let resp = text(*status, message.clone());
                    Err(match offset {
                        Some(o) => with_offset(resp, *o),
                        None => resp,
                    })
                }
                Admission::Start => {
                    g.phase = Phase::Receiving;
                    Ok((admission, None))
                }
                Admission::Resume | Admission::Restart => {
                    match std::mem::replace(&mut g.phase, Phase::Receiving) {
                        Phase::Interrupted(s) => Ok((admission, Some(s))),
                        other => {
                            g.phase = other;
                            Err(text(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "upload state changed; retry",
                            ))
                        }
                    }
                }
            }
        };
        let (admission, held) = match admitted {
            Ok(a) => a,
            Err(resp) => return refuse(body, resp).await,
        };

        let session = match (admission, held) {
            (Admission::Resume, Some(s)) => {
                if expected.is_some() && expected != s.expected {
                    let offset = s.offset;
                    self.set_phase(Phase::Interrupted(s));
                    return with_offset(
                        text(
                            StatusCode::BAD_REQUEST,
                            "Content-Digest of a resumed upload must equal the one sent first",
                        ),
                        offset,
                    );
                }
                tracing::info!(offset = s.offset, "resuming interrupted upload");
                *s
            }
            (admission, held) => {
                if let Some(old) = held {
                    debug_assert_eq!(admission, Admission::Restart);
                    tracing::info!(
                        offset = old.offset,
                        "new upload replaces an interrupted one"
                    );
                    self.discard(*old).await;
                }
                let stream = if endpoint.form {
                    match file_part(&headers, body).await {
                        Ok(s) => s,
                        Err(resp) => {
                            self.set_phase(Phase::Idle);
                            return resp;
                        }
                    }
                } else {
                    body.into_data_stream().map_err(|e| e.to_string()).boxed()
                };
                let session = match self.start_session(expected, endpoint.archive) {
                    Ok(s) => s,
                    Err(e) => {
                        self.set_phase(Phase::Idle);
                        return text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("Saving stream failed: {e}"),
                        );
                    }
                };
                return self.receive(endpoint, session, stream).await;
            }
        };
        let stream = body.into_data_stream().map_err(|e| e.to_string()).boxed();
        self.receive(endpoint, session, stream).await
    }

    fn start_session(
        &self,
        expected: Option<ExpectedDigest>,
        archive: bool,
    ) -> io::Result<Session> {
        let target_size = target_size(&self.settings)?;
        let opts = ConvertOptions {
            target_size,
            preallocation: if self.settings.preallocation {
                Preallocation::Fallocate
            } else {
                Preallocation::Off
            },
            scratch_dir: self.settings.scratch_dir.clone(),
            ..Default::default()
        };
        let (feed, mut reader) = feed::channel();
        let destination = self.settings.destination.clone();
        let job = if archive {
            let dir = destination
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            tokio::task::spawn_blocking(move || crate::archive::extract(Box::new(reader), &dir))
        } else {
            tokio::task::spawn_blocking(move || {
                let mut target = cdi_formats::target::open_target(&destination)?;
                cdi_formats::convert::convert_reader(&mut reader, target.as_mut(), &opts)
            })
        };
        let id = {
            let mut g = self.lock();
            g.next_id += 1;
            g.next_id
        };
        let hasher = expected.as_ref().map(|d| Hasher::new(d.algorithm));
        Ok(Session {
            id,
            feed,
            job,
            offset: 0,
            expected,
            hasher,
        })
    }

    async fn receive(
        self: Arc<Self>,
        endpoint: Endpoint,
        mut session: Session,
        mut stream: BoxStream<'static, Result<Bytes, String>>,
    ) -> Response {
        match pump(&mut session, &mut stream).await {
            PumpEnd::Complete => {}
            PumpEnd::BodyError(reason) if endpoint.resumable() => {
                let offset = session.offset;
                tracing::warn!(offset, "upload body interrupted: {reason}");
                let id = session.id;
                self.set_phase(Phase::Interrupted(Box::new(session)));
                self.clone().expire_later(id);
                return with_offset(
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "Saving stream failed: failed to pull image: {reason}; resume with \
                             Upload-Offset: {offset} within {}s",
                            self.settings.resume_window.as_secs()
                        ),
                    ),
                    offset,
                );
            }
            PumpEnd::BodyError(reason) => {
                self.discard(session).await;
                self.set_phase(Phase::Idle);
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("Saving stream failed: failed to pull image: {reason}"),
                );
            }
            PumpEnd::ConverterGone => {
                // The converter refused the image early (often from its header: too large for
                // the volume). Read on for a moment so the client, still sending, is listening
                // when the answer comes, instead of seeing a reset connection.
                drain(&mut stream).await;
                return self.settle(session.job, true).await;
            }
        }

        if let (Some(want), Some(hasher)) = (&session.expected, &session.hasher) {
            let got = hasher.finalize();
            if got != want.value {
                let message = format!(
                    "Content-Digest mismatch: expected {}, received {}",
                    digest::format_content_digest(want.algorithm, &want.value),
                    digest::format_content_digest(want.algorithm, &got)
                );
                tracing::warn!("{message}");
                let _ = session
                    .feed
                    .send(Msg::Abort("content digest mismatch".into()))
                    .await;
                self.discard(session).await;
                self.set_phase(Phase::Idle);
                return text(StatusCode::BAD_REQUEST, message);
            }
        }
        let eof = session.feed.eof();
        // If the converter is already gone, `settle` reports why.
        let _ = session.feed.send(Msg::End).await;
        self.set_phase(Phase::Finishing);
        if endpoint.sync {
            return self.settle(session.job, true).await;
        }
        self.answer_async(session.job, eof).await
    }

    /// Async endpoints: answer once the converter has consumed the whole body (only the
    /// target's finish remains), then finish in the background.
    async fn answer_async(
        self: Arc<Self>,
        mut job: JoinHandle<Result<ConvertReport, cdi_formats::Error>>,
        eof: Arc<EofSignal>,
    ) -> Response {
        tokio::select! {
            () = eof.wait() => {}
            res = &mut job => return self.settle_result(flatten(res), true).await,
        }
        let srv = self.clone();
        tokio::spawn(async move {
            let _ = srv.settle_result(flatten(job.await), false).await;
        });
        StatusCode::OK.into_response()
    }

    async fn settle(
        self: Arc<Self>,
        job: JoinHandle<Result<ConvertReport, cdi_formats::Error>>,
        retry_on_failure: bool,
    ) -> Response {
        self.settle_result(flatten(job.await), retry_on_failure)
            .await
    }

    /// Record the end of a conversion. Success completes the server; failure removes partial
    /// data and either returns to idle (the client may retry) or, for background failures,
    /// ends the server like upstream.
    async fn settle_result(
        self: Arc<Self>,
        result: Result<ConvertReport, cdi_formats::Error>,
        retry_on_failure: bool,
    ) -> Response {
        match result {
            Ok(report) => {
                tracing::info!(
                    format = ?report.format,
                    input_bytes = report.input_bytes,
                    virtual_size = report.virtual_size,
                    "upload complete"
                );
                self.set_phase(Phase::Done);
                let msg = TerminationMessage {
                    preallocation_applied: Some(self.settings.preallocation),
                    ..TerminationMessage::with_message(UPLOAD_COMPLETE)
                };
                self.outcome.send_replace(Outcome::Completed(msg));
                StatusCode::OK.into_response()
            }
            Err(err) => {
                tracing::warn!(kind = err.kind().label(), "upload failed: {err}");
                remove_partial(&self.settings.destination);
                let (status, message) = failure_response(&err);
                if retry_on_failure {
                    self.set_phase(Phase::Idle);
                } else {
                    self.outcome.send_replace(Outcome::Failed(message.clone()));
                }
                text(status, message)
            }
        }
    }

    /// Stop a session's conversion and remove what it wrote.
    async fn discard(&self, session: Session) {
        let Session { feed, job, .. } = session;
        drop(feed);
        let _ = job.await;
        remove_partial(&self.settings.destination);
    }

    fn expire_later(self: Arc<Self>, id: u64) {
        let window = self.settings.resume_window;
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let expired = {
                let mut g = self.lock();
                match std::mem::replace(&mut g.phase, Phase::Receiving) {
                    Phase::Interrupted(s) if s.id == id => Some(s),
                    other => {
                        g.phase = other;
                        None
                    }
                }
            };
            if let Some(s) = expired {
                tracing::warn!(
                    offset = s.offset,
                    "interrupted upload not resumed in time; abandoned"
                );
                self.discard(*s).await;
                self.set_phase(Phase::Idle);
            }
        });
    }
}

/// The upload headers of an authorized request: `Upload-Offset` and `Content-Digest`, after
/// refusing upstream's clone switch.
fn upload_headers(
    headers: &HeaderMap,
) -> Result<(Option<u64>, Option<ExpectedDigest>), (StatusCode, String)> {
    if let Some(ct) = headers.get(CDI_CONTENT_TYPE).and_then(|v| v.to_str().ok())
        && ct.ends_with("-clone")
    {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("{CDI_CONTENT_TYPE} {ct:?} is not supported"),
        ));
    }
    let requested = match headers.get(UPLOAD_OFFSET) {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    "Upload-Offset must be a byte count".into(),
                ));
            }
        },
    };
    let expected = match headers.get(CONTENT_DIGEST).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => match digest::parse_content_digest(v) {
            Ok(d) => Some(d),
            Err(e) => return Err((StatusCode::BAD_REQUEST, e.to_string())),
        },
        Some(Err(_)) => {
            return Err((
                StatusCode::BAD_REQUEST,
                "Content-Digest is not ASCII".into(),
            ));
        }
    };
    Ok((requested, expected))
}

/// Answer a refused upload request after reading (and dropping) its body for at most
/// [`EARLY_ERROR_DRAIN`]: a client that is still sending, or a proxy that already told its
/// client to go on (`100 Continue`), would otherwise see the connection reset instead of the
/// status (409 after completion, 503 while busy).
async fn refuse(body: Body, resp: Response) -> Response {
    drain(&mut body.into_data_stream()).await;
    resp
}

/// Read and drop what is left of a request body, for at most [`EARLY_ERROR_DRAIN`].
async fn drain<S, T, E>(stream: &mut S)
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
{
    let _ = tokio::time::timeout(EARLY_ERROR_DRAIN, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

fn flatten(
    res: Result<Result<ConvertReport, cdi_formats::Error>, tokio::task::JoinError>,
) -> Result<ConvertReport, cdi_formats::Error> {
    res.unwrap_or_else(|e| {
        Err(cdi_formats::Error::new(
            ErrorKind::Io,
            format!("conversion thread failed: {e}"),
        ))
    })
}

async fn pump(
    session: &mut Session,
    stream: &mut BoxStream<'static, Result<Bytes, String>>,
) -> PumpEnd {
    while let Some(item) = stream.next().await {
        match item {
            Ok(bytes) if bytes.is_empty() => {}
            Ok(bytes) => {
                let n = bytes.len() as u64;
                if let Some(h) = session.hasher.as_mut() {
                    h.update(&bytes);
                }
                if session.feed.send(Msg::Data(bytes)).await.is_err() {
                    return PumpEnd::ConverterGone;
                }
                session.offset += n;
            }
            Err(e) => return PumpEnd::BodyError(e),
        }
    }
    PumpEnd::Complete
}

/// The `file` part of a multipart body, as a stream; other parts are skipped unread.
async fn file_part(
    headers: &HeaderMap,
    body: Body,
) -> Result<BoxStream<'static, Result<Bytes, String>>, Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        text(
            StatusCode::BAD_REQUEST,
            "form upload needs a multipart/form-data body with a boundary",
        )
    })?;
    let mut multipart = multer::Multipart::new(body.into_data_stream(), boundary);
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) if field.name() == Some("file") => {
                return Ok(field.map_err(|e| e.to_string()).boxed());
            }
            Ok(Some(_)) => continue,
            Ok(None) => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    "form has no part named \"file\"",
                ));
            }
            Err(e) => {
                return Err(text(
                    StatusCode::BAD_REQUEST,
                    format!("reading multipart form: {e}"),
                ));
            }
        }
    }
}

/// The size the image may take: upstream's `min(UPLOAD_IMAGE_SIZE, usable(min(statfs avail,
/// UPLOAD_IMAGE_SIZE)))` for files; `None` (the device size) for block devices.
pub fn target_size(settings: &Settings) -> io::Result<Option<u64>> {
    use std::os::unix::fs::FileTypeExt;
    let dest = &settings.destination;
    if std::fs::metadata(dest).is_ok_and(|m| m.file_type().is_block_device()) {
        return Ok(None);
    }
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let vfs = rustix::fs::statvfs(dir)
        .map_err(|e| io::Error::other(format!("statfs {}: {e}", dir.display())))?;
    // Space already held by a previous attempt's file is about to be freed by truncation.
    let existing = std::fs::metadata(dest).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    let available = vfs.f_bavail.saturating_mul(vfs.f_frsize) + existing.unwrap_or(0);
    Ok(Some(size_within(
        settings.image_size,
        settings.overhead,
        available,
    )))
}

/// The pure part of [`target_size`].
pub fn size_within(image_size: Option<u64>, overhead: f64, available: u64) -> u64 {
    let bound = image_size.map_or(available, |s| s.min(available));
    let usable = cdi_api::overhead::usable_space(overhead, bound);
    image_size.map_or(usable, |s| s.min(usable))
}

fn remove_partial(dest: &Path) {
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.file_type().is_file() => {
            if let Err(e) = std::fs::remove_file(dest) {
                tracing::warn!("removing partial image {}: {e}", dest.display());
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_errors_are_400_with_upstreams_message() {
        let err = cdi_formats::Error::new(ErrorKind::TargetTooSmall, "virtual size 2 GiB > 1 GiB");
        let (status, msg) = failure_response(&err);
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(msg.starts_with(CAPACITY_MESSAGE), "{msg}");
        assert_eq!(
            cdi_api::termination::simplify_known_message(&msg),
            "DataVolume too small to contain image"
        );
    }

    #[test]
    fn enospc_is_400() {
        let err = cdi_formats::Error::new(ErrorKind::NoSpace, "writing");
        assert_eq!(failure_response(&err).0, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn corrupt_image_is_500() {
        let err = cdi_formats::Error::corrupt("bad l1 table");
        assert_eq!(failure_response(&err).0, StatusCode::INTERNAL_SERVER_ERROR);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn upload_headers_are_checked_before_the_body() {
        assert_eq!(upload_headers(&HeaderMap::new()).unwrap(), (None, None));
        let (offset, digest) = upload_headers(&headers(&[
            (UPLOAD_OFFSET, " 42 "),
            (
                CONTENT_DIGEST,
                "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:",
            ),
        ]))
        .unwrap();
        assert_eq!(offset, Some(42));
        assert!(digest.is_some());
        let refused = |h: HeaderMap| upload_headers(&h).unwrap_err().0;
        assert_eq!(
            refused(headers(&[(UPLOAD_OFFSET, "-1")])),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(headers(&[(CONTENT_DIGEST, "md5=:abc:")])),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            refused(headers(&[(CDI_CONTENT_TYPE, "filesystem-clone")])),
            StatusCode::BAD_REQUEST
        );
    }

    #[tokio::test]
    async fn a_refusal_reads_the_body_first() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, io::Error>>(4);
        let body = Body::from_stream(stream_of(rx));
        tx.send(Ok(Bytes::from_static(b"abc"))).await.unwrap();
        let sender = tokio::spawn(async move {
            // The refusal must keep reading while the client sends.
            for _ in 0..16 {
                if tx.send(Ok(Bytes::from_static(b"more"))).await.is_err() {
                    return false;
                }
            }
            true
        });
        let resp = refuse(body, text(StatusCode::CONFLICT, "done")).await;
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        assert!(sender.await.unwrap(), "every chunk was consumed");
    }

    fn stream_of(
        mut rx: tokio::sync::mpsc::Receiver<Result<Bytes, io::Error>>,
    ) -> impl futures::Stream<Item = Result<Bytes, io::Error>> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[test]
    fn requested_size_bounds_the_target() {
        assert_eq!(size_within(Some(100 << 20), 0.0, 1 << 40), 100 << 20);
    }

    #[test]
    fn overhead_shrinks_the_target_like_upstream() {
        // min(avail, size) = 1 GiB, usable = round_down(ceil(1 GiB / 1.06), 1 MiB) = 966 MiB.
        assert_eq!(size_within(Some(1 << 30), 0.06, 1 << 40), 966 << 20);
    }

    #[test]
    fn small_filesystem_bounds_the_target() {
        assert_eq!(size_within(Some(1 << 30), 0.0, 10 << 20), 10 << 20);
    }
}
