//! Answer texts of the upload protocol that clients match on, shared by the upload server,
//! the upload proxy and `cdi image-upload`.

/// The upload server's 409 reason once the image is complete: tells a client whose 200 was
/// lost that its upload is done (a conflicting offset is a 409 too, with another text).
pub const ALREADY_COMPLETED: &str = "upload already completed";

/// The end of the proxy's 503 reason for a volume whose upload succeeded (upstream's wording).
pub const ALREADY_FINISHED: &str = "already finished uploading";
