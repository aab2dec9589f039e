//! Names of the CDI API shared by crates that do not need the typed resources
//! (`cdi-resources` holds the typed DataVolume and the rest).

/// API group of CDI resources.
pub const CDI_GROUP: &str = "cdi.kubevirt.io";
/// Storage version of CDI resources.
pub const CDI_V1BETA1: &str = "cdi.kubevirt.io/v1beta1";
/// Older version still accepted for DataVolumes.
pub const CDI_V1ALPHA1: &str = "cdi.kubevirt.io/v1alpha1";
/// Annotation marking the default storage class.
pub const ANN_DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
/// Annotation marking the default virtualization storage class (preferred for VM disks).
pub const ANN_DEFAULT_VIRT_CLASS: &str = "storageclass.kubevirt.io/is-default-virt-class";
