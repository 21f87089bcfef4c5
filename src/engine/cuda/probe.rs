//! Finds the CUDA libraries and a device without letting cudarc panic.
use std::panic::catch_unwind;

/// What [`probe`] found.
#[derive(Debug, Clone)]
pub struct ProbeInfo {
    pub devices: usize,
    /// Device 0, the one the backend uses.
    pub name: String,
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version and NVRTC's, e.g. (13, 0): PTX from an NVRTC newer than the
    /// driver does not load.
    pub driver_version: (i32, i32),
    pub nvrtc_version: (i32, i32),
}

/// Whether libnvrtc can be loaded (cudarc's own search: its usual names on the loader path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only dlopen()s candidate library names and closes them again.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Checks, without risking cudarc's panics, that the driver, NVRTC and cuBLAS libraries load
/// and that there is at least one CUDA device.
pub fn probe() -> Result<ProbeInfo, String> {
    // The three checks only dlopen()/dlclose() candidate names; nothing is called.
    let libs = [
        // SAFETY: see above.
        ("libcuda (the NVIDIA driver)", unsafe {
            cudarc::driver::sys::is_culib_present()
        }),
        ("libnvrtc", nvrtc_available()),
        // SAFETY: see above.
        ("libcublas", unsafe {
            cudarc::cublas::sys::is_culib_present()
        }),
    ];
    let missing: Vec<&str> = libs.iter().filter(|l| !l.1).map(|l| l.0).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} not found on the library path (ldconfig, LD_LIBRARY_PATH)",
            missing.join(", ")
        ));
    }
    // A library with missing symbols still panics inside cudarc: contain it.
    catch_unwind(|| -> Result<ProbeInfo, String> {
        use cudarc::driver::result::{device, init};
        use cudarc::driver::sys::CUdevice_attribute as A;
        init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        let n = device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e:?}"))?;
        if n <= 0 {
            return Err("the CUDA driver reports no device".into());
        }
        let dev = device::get(0).map_err(|e| format!("cuDeviceGet(0) failed: {e:?}"))?;
        let name = device::get_name(dev).map_err(|e| format!("cuDeviceGetName: {e:?}"))?;
        // SAFETY: `dev` came from cuDeviceGet.
        let cc = unsafe {
            (
                device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            )
        };
        match cc {
            (Ok(major), Ok(minor)) => {
                let (mut dv, mut nv) = (0, (0, 0));
                // SAFETY: out-pointers to locals; both calls exist in every supported version.
                unsafe {
                    let _ = cudarc::driver::sys::cuDriverGetVersion(&mut dv);
                    let _ = cudarc::nvrtc::sys::nvrtcVersion(&mut nv.0, &mut nv.1);
                }
                Ok(ProbeInfo {
                    devices: n as usize,
                    name,
                    compute_capability: (major, minor),
                    driver_version: (dv / 1000, dv % 1000 / 10),
                    nvrtc_version: nv,
                })
            }
            _ => Err("cannot read the device's compute capability".into()),
        }
    })
    .unwrap_or_else(|_| Err("the CUDA libraries failed to load (see the panic above)".into()))
}
