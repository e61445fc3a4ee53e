//! A destination opens an arriving VM's disks only under its storage directories.
use std::path::{Path, PathBuf};

use migratable::{DeviceConfig, DeviceConfigError, DiskConfig, VmConfig};

fn vm_with_disk(path: &Path) -> VmConfig {
    VmConfig {
        devices: vec![DeviceConfig::Disk(DiskConfig {
            path: path.to_path_buf(),
            readonly: false,
        })],
        ..VmConfig::new(128 << 20, 1)
    }
}

#[test]
fn arriving_disks_must_lie_under_a_storage_directory() {
    let d = tempfile::tempdir().unwrap();
    let store = d.path().join("store");
    let elsewhere = d.path().join("elsewhere");
    for dir in [&store, &elsewhere] {
        std::fs::create_dir(dir).unwrap();
    }
    let inside = store.join("vm.img");
    let outside = elsewhere.join("secret");
    for f in [&inside, &outside] {
        std::fs::write(f, b"").unwrap();
    }
    let roots = [store.clone()];
    assert!(vm_with_disk(&inside).check_disks_within(&roots).is_ok());
    let err = vm_with_disk(&outside)
        .check_disks_within(&roots)
        .unwrap_err();
    assert!(matches!(err, DeviceConfigError::Outside { .. }), "{err}");
    assert!(err.to_string().contains("--storage"), "{err}");
    // `..` and symbolic links are resolved before the check.
    let dotdot: PathBuf = store.join("../elsewhere/secret");
    assert!(vm_with_disk(&dotdot).check_disks_within(&roots).is_err());
    let link = store.join("link.img");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    assert!(vm_with_disk(&link).check_disks_within(&roots).is_err());
    // A missing image is named; a host without storage takes no disks; no disks, no check.
    let missing = vm_with_disk(&store.join("gone.img")).check_disks_within(&roots);
    assert!(matches!(missing, Err(DeviceConfigError::Resolve { .. })));
    let none = vm_with_disk(&inside).check_disks_within(&[]).unwrap_err();
    assert!(
        matches!(none, DeviceConfigError::NoStorage { .. }),
        "{none}"
    );
    assert!(VmConfig::new(128 << 20, 1).check_disks_within(&[]).is_ok());
}
