# Yocto/OpenEmbedded recipe for EdgeMesh. The image already carries Python, so this installs
# the Python package with its dependencies from meta-python/meta-oe instead of a frozen
# binary, plus the systemd units and sysctl settings from packaging/.
#
# Layers: meta-openembedded/meta-oe and meta-python (python3-gevent, python3-requests,
# python3-pyopenssl, python3-cryptography, python3-click, python3-pyyaml, python3-h11,
# python3-wsproto). python3-dnslib: check your meta-python release; where it is missing,
# add a two-line recipe (inherit pypi python_setuptools_build_meta). Not built here: this
# recipe has not been run through bitbake (no Yocto build host in our CI).
SUMMARY = "EdgeMesh: the data plane of an edge Kubernetes (KubeEdge) cluster"
DESCRIPTION = "One agent per node answers cluster DNS names and proxies service traffic \
to endpoints on this node or, through an encrypted tunnel, on other nodes behind NATs."
HOMEPAGE = "https://github.com/kubeedge/edgemesh"
LICENSE = "Apache-2.0"
# the source's own license text (the repository's LICENSE, the Apache License 2.0 verbatim)
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# Placeholder: set EDGEMESH_SRC_URI (local.conf or a bbappend) to where your EdgeMesh source
# lives, and pin SRCREV to a commit for reproducible images.
EDGEMESH_SRC_URI ?= "git://git.example.org/edgemesh.git;protocol=https;branch=main"
SRC_URI = "${EDGEMESH_SRC_URI}"
SRCREV ?= "${AUTOREV}"
S = "${WORKDIR}/git"

inherit python_setuptools_build_meta systemd

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "edgemesh-agent.service edgemesh-server.service"
SYSTEMD_AUTO_ENABLE:${PN} = "disable"

do_install:append() {
    install -d ${D}${systemd_system_unitdir} ${D}${sysconfdir}/sysctl.d ${D}${sysconfdir}/edgemesh
    install -m 0644 ${S}/packaging/systemd/edgemesh-agent.service ${D}${systemd_system_unitdir}/
    install -m 0644 ${S}/packaging/systemd/edgemesh-server.service ${D}${systemd_system_unitdir}/
    # the units run /usr/bin/edgemesh, which setuptools installs as the console script
    install -m 0644 ${S}/packaging/sysctl.d/60-edgemesh.conf ${D}${sysconfdir}/sysctl.d/
}

RDEPENDS:${PN} += " \
    python3-core python3-json python3-logging python3-netclient python3-ipaddress \
    python3-gevent python3-greenlet python3-requests python3-urllib3 python3-cryptography \
    python3-click python3-pyyaml python3-dnslib \
    iptables iproute2 \
"
# kernel: nf_tables or x_tables NAT (DNAT), bridge for edgemesh0
RRECOMMENDS:${PN} += "kernel-module-nf-nat kernel-module-xt-nat kernel-module-bridge"

FILES:${PN} += "${systemd_system_unitdir} ${sysconfdir}/sysctl.d ${sysconfdir}/edgemesh"
CONFFILES:${PN} = "${sysconfdir}/sysctl.d/60-edgemesh.conf"
