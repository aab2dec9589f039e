//! S3 imports through the importer library against moto with SigV4 enforcement.

use std::sync::Arc;

use cdi_importer::progress::Progress;
use cdi_importer::source::http::Credentials;
use cdi_importer::{Destination, ErrorKind, ImportRequest, SourceSpec, run_import};
use cdi_tests::s3::S3Server;
use cdi_tests::{have, qemu, skip};
use tokio_util::sync::CancellationToken;
use url::Url;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_with_sigv4_and_a_wrong_secret() {
    for tool in ["python3", "qemu-img", "qemu-io", "gzip"] {
        if !have(tool) {
            skip(&format!("{tool} is not installed"));
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let fx = qemu::fixtures(&tmp.path().join("img"), 16 << 20).unwrap();
    let s3 = match S3Server::start(&tmp.path().join("s3")) {
        Ok(s) => s,
        Err(e) => panic!("moto could not start (CI prepares its virtualenv): {e}"),
    };
    s3.create_bucket("images").unwrap();
    s3.put_object("images", "os/disk.qcow2.gz", &fx.qcow2_gz)
        .unwrap();
    let url = Url::parse(&s3.object_url("images", "os/disk.qcow2.gz")).unwrap();

    let dest = tmp.path().join("s3.raw");
    let mut req = ImportRequest::new(SourceSpec::S3(url.clone()), Destination::File(dest.clone()));
    req.credentials = Some(Credentials {
        user: s3.access_key.clone(),
        password: s3.secret_key.clone(),
    });
    run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap();
    qemu::assert_same_image(&dest, &fx.qcow2);

    let mut req = ImportRequest::new(
        SourceSpec::S3(url.clone()),
        Destination::File(tmp.path().join("bad.raw")),
    );
    req.credentials = Some(Credentials {
        user: s3.access_key.clone(),
        password: "wrong-secret".into(),
    });
    let err = run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connect);
    let msg = err.to_string();
    assert!(
        msg.starts_with("Unable to connect to s3 data source:"),
        "{msg}"
    );
    assert!(msg.contains("403"), "{msg}");
    assert!(msg.contains("SignatureDoesNotMatch"), "{msg}");

    // Anonymous requests are refused by a server that enforces signatures.
    let req = ImportRequest::new(
        SourceSpec::S3(url),
        Destination::File(tmp.path().join("anon.raw")),
    );
    let err = run_import(req, Arc::new(Progress::default()), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
}
