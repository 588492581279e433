//! Tests of [`DomainXml`](super::DomainXml): what each shape renders to.

use super::*;

#[test]
fn renders_a_full_kvm_domain() {
    let xml = DomainXml::new("web-1")
        .uuid("4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
        .memory_mib(1024)
        .vcpus(2)
        .arch("x86_64")
        .machine("q35")
        .disk(Disk::new(
            "/var/lib/gve/web-1.qcow2",
            DiskFormat::Qcow2,
            "vda",
        ))
        .network("default")
        .serial_console()
        .guest_agent()
        .label("owner", "alice")
        .to_xml();
    let expected = "\
<domain type='kvm'>
  <name>web-1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <metadata>
    <gve:labels xmlns:gve='urn:gve:hypervisor:labels:0.1'>
      <gve:label key='owner'>alice</gve:label>
    </gve:labels>
  </metadata>
  <memory unit='MiB'>1024</memory>
  <currentMemory unit='MiB'>1024</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/gve/web-1.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
";
    assert_eq!(xml, expected);
}

#[test]
fn direct_kernel_boot_xen_without_acpi() {
    let xml = DomainXml::new("pv")
        .domain_type("xen")
        .os_type(OsType::Xen)
        .kernel("/boot/vmlinuz")
        .initrd("/boot/initrd.img")
        .cmdline("console=hvc0 root=/dev/xvda")
        .acpi(false)
        .disk(Disk {
            bus: DiskBus::Xen,
            readonly: true,
            ..Disk::new("/img/pv.raw", DiskFormat::Raw, "xvda")
        })
        .user_network()
        .to_xml();
    assert!(xml.starts_with("<domain type='xen'>\n"));
    assert!(xml.contains("<type>xen</type>\n    <kernel>/boot/vmlinuz</kernel>"));
    assert!(xml.contains("<initrd>/boot/initrd.img</initrd>"));
    assert!(xml.contains("<cmdline>console=hvc0 root=/dev/xvda</cmdline>"));
    assert!(!xml.contains("<boot"));
    assert!(!xml.contains("<features>"));
    assert!(xml.contains("<driver name='qemu' type='raw'/>"));
    assert!(xml.contains("<target dev='xvda' bus='xen'/>\n      <readonly/>"));
    assert!(xml.contains("<interface type='user'>\n      <model type='virtio'/>"));
    assert!(!xml.contains("<metadata>"));
}

#[test]
fn xen_pv_disks_are_served_by_blkback_and_the_console_is_xens() {
    let xml = DomainXml::new("pv")
        .domain_type("xen")
        .os_type(OsType::Xen)
        .acpi(false)
        .disk(Disk::xen_pv("/img/pv.img", "xvda"))
        .xen_console()
        .to_xml();
    assert!(xml.contains(
        "<driver name='phy' type='raw'/>\n      <source file='/img/pv.img'/>\n      \
             <target dev='xvda' bus='xen'/>"
    ));
    assert!(xml.contains("<console type='pty'>\n      <target type='xen' port='0'/>"));
    assert!(!xml.contains("<serial"));
}

#[test]
fn a_cpu_is_written_after_the_features_with_its_model_and_features() {
    let plain = DomainXml::new("a").cpu(Some(Cpu {
        mode: Some("maximum".into()),
        ..Cpu::default()
    }));
    assert!(plain
        .to_xml()
        .contains("  </features>\n  <cpu mode='maximum'/>\n  <devices>"));
    let custom = DomainXml::new("b").cpu(Some(Cpu {
        mode: Some("custom".into()),
        matching: Some("exact".into()),
        check: Some("none".into()),
        model: Some("Skylake'".into()),
        fallback: Some("forbid".into()),
        features: vec![("disable".into(), "avx512f".into())],
        ..Cpu::default()
    }));
    assert!(custom.to_xml().contains(
            "  <cpu mode='custom' match='exact' check='none'>\n    <model fallback='forbid'>Skylake&apos;</model>\n    \
             <feature policy='disable' name='avx512f'/>\n  </cpu>\n"
        ));
    let host = DomainXml::new("h").cpu(Some(Cpu {
        mode: Some("host-passthrough".into()),
        migratable: Some("off".into()),
        fallback: Some("allow".into()),
        ..Cpu::default()
    }));
    assert!(host.to_xml().contains(
            "  <cpu mode='host-passthrough' migratable='off'>\n    <model fallback='allow'/>\n  </cpu>\n"
        ));
    assert!(!DomainXml::new("c").to_xml().contains("<cpu"));
}

#[test]
fn escapes_text_and_attributes() {
    let xml = DomainXml::new("a<b>&'c\"")
        .label("k'", "v<&>")
        .disk(Disk::new("/x/it's.qcow2", DiskFormat::Qcow2, "vda"))
        .to_xml();
    assert!(xml.contains("<name>a&lt;b&gt;&amp;&apos;c&quot;</name>"));
    assert!(xml.contains("<gve:label key='k&apos;'>v&lt;&amp;&gt;</gve:label>"));
    assert!(xml.contains("<source file='/x/it&apos;s.qcow2'/>"));
    assert_eq!(escape("1 < 2 & 3"), "1 &lt; 2 &amp; 3");
}
