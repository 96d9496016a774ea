//! Public Suffix List helpers: registrable domains (eTLD+1) and the wildcard lint. This
//! module owns every question the policy asks of the PSL (compiled in by the `psl` crate:
//! no network, no file) and the curated table of cloud and hosting namespaces where any
//! customer can obtain a name, which the PSL lists only in part. It is pure: no I/O.
//!
//! Names are expected normalised (lowercase A-labels, no trailing dot); a single trailing
//! dot is tolerated. [`wildcard_risk`] also lowercases and strips a leading `*.`/`.`.

use ::psl::Type;

/// The registrable domain (eTLD+1) of a normalised lowercase name, per the PSL (ICANN and
/// private sections).
///
/// Under a suffix the list does not know, the last two labels (the PSL's default `*`
/// rule). A name that is itself a public suffix, or has one label: the name itself. A
/// trailing dot is dropped; the empty name gives `""`. Never panics.
///
/// ```text
/// www.example.co.uk  -> example.co.uk
/// a.b.github.io      -> b.github.io
/// x.y.unknowntld-zz  -> y.unknowntld-zz
/// com                -> com
/// ```
pub fn registrable_domain(name: &str) -> &str {
    let name = name.strip_suffix('.').unwrap_or(name);
    match ::psl::domain(name.as_bytes()) {
        Some(d) => {
            // `d` is a tail of `name` that starts right after a `.` (or at 0): a char
            // boundary, so `get` succeeds; fall back to the whole name regardless.
            let start = name.len().saturating_sub(d.as_bytes().len());
            name.get(start..).unwrap_or(name)
        }
        None => name,
    }
}

/// True if the whole name is a public suffix listed by the PSL (ICANN or private).
///
/// A top-level domain the list does not know is *not* reported here (the default `*`
/// rule is implicit, not a listing). A trailing dot is tolerated; `""` is not a suffix.
pub fn is_public_suffix(name: &str) -> bool {
    listed(name.strip_suffix('.').unwrap_or(name)).is_some()
}

/// The PSL section if the whole of `name` (no trailing dot) is a listed public suffix.
fn listed(name: &str) -> Option<Type> {
    if name.is_empty() {
        return None;
    }
    let suffix = ::psl::suffix(name.as_bytes())?;
    let typ = suffix.typ()?;
    (suffix.as_bytes().len() == name.len()).then_some(typ)
}

fn section(typ: Type) -> &'static str {
    match typ {
        Type::Icann => "ICANN section of the Public Suffix List",
        Type::Private => {
            "PRIVATE section of the Public Suffix List: a shared-tenant domain where any \
             customer of its operator gets names"
        }
    }
}

/// A child label used to ask the PSL about the children of a name. Long and odd enough
/// that no exception rule (`!label.suffix`) names it.
const PROBE: &str = "egressd-probe-0";

/// Top-level names reserved so that they can never be delegated in the public DNS (RFC
/// 6761 `test`, `localhost`, `invalid`, `example`; RFC 6762 `local`; RFC 9476 `alt`; the
/// ICANN private-use `internal`). No outsider can register under them, so a wildcard
/// over one is not an exfiltration path (names there resolve only through the VPC's own
/// resolver). Any other unlisted TLD is treated as a public suffix.
const RESERVED_TLDS: &[&str] = &["alt", "example", "internal", "invalid", "local", "localhost", "test"];

/// Labels tried as children (and, through the `*` rule probe, grandchildren) of a
/// wildcard's domain to find PSL entries *below* it: AWS regions and the service and
/// zone labels the PSL's private section uses under provider domains. Finding one proves
/// the domain is an ancestor of a public suffix. Incomplete by nature: the curated table
/// covers what matters most.
const CHILD_PROBES: &[&str] = &[
    // AWS regions.
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "us-gov-east-1",
    "us-gov-west-1",
    "af-south-1",
    "ap-east-1",
    "ap-east-2",
    "ap-south-1",
    "ap-south-2",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-7",
    "ca-central-1",
    "ca-west-1",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "il-central-1",
    "me-central-1",
    "me-south-1",
    "mx-central-1",
    "sa-east-1",
    "cn-north-1",
    "cn-northwest-1",
    // Service and zone labels.
    "s3",
    "s3-website",
    "s3-accesspoint",
    "s3-object-lambda",
    "dualstack",
    "execute-api",
    "lambda-url",
    "elb",
    "compute",
    "compute-1",
    "airflow",
    "rds",
    "auth",
    "blob",
    "web",
    "file",
    "dfs",
    "a",
    "c",
    "r",
    "id",
    "eu",
    "us",
    "app",
    "apps",
    "api",
    "cdn",
    "prod",
    "global",
    "freetls",
    "ssl",
    "user",
    "users",
];

/// A namespace of the curated table.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Every name directly under an instance is one customer's (a bucket, an app, …).
    Tenants,
    /// A provider domain that holds such namespaces (and will add more over time).
    Parent,
}

/// One curated entry. `pattern` is a domain whose labels may be `{region}` (a cloud
/// region label such as `us-east-1`, `us-gov-west-1`, `cn-north-1`, `us-west-004`) or,
/// as the leftmost label only, `{any}` (any single label).
struct Shared {
    pattern: &'static str,
    kind: Kind,
    what: &'static str,
}

const fn tenants(pattern: &'static str, what: &'static str) -> Shared {
    Shared { pattern, kind: Kind::Tenants, what }
}

const fn parent(pattern: &'static str, what: &'static str) -> Shared {
    Shared { pattern, kind: Kind::Parent, what }
}

/// Curated shared-tenant namespaces: where any customer of a cloud, hosting, tunnelling
/// or out-of-band-testing service can obtain a name, whether or not the PSL lists it
/// (many are missing: ECR registries, Azure SQL and Key Vault, GCS buckets, tunnels).
static SHARED: &[Shared] = &[
    // ----- Amazon Web Services -----
    parent("amazonaws.com", "Amazon Web Services"),
    tenants("s3.amazonaws.com", "Amazon S3 buckets"),
    tenants("s3.{region}.amazonaws.com", "Amazon S3 buckets"),
    tenants("s3.dualstack.{region}.amazonaws.com", "Amazon S3 buckets"),
    tenants("s3-website.{region}.amazonaws.com", "Amazon S3 website buckets"),
    tenants("s3-accesspoint.{region}.amazonaws.com", "Amazon S3 access points"),
    tenants("s3-control.{region}.amazonaws.com", "Amazon S3 account endpoints"),
    tenants("execute-api.{region}.amazonaws.com", "Amazon API Gateway APIs"),
    tenants("dkr.ecr.{region}.amazonaws.com", "Amazon ECR registries"),
    tenants("{region}.elb.amazonaws.com", "Elastic Load Balancing load balancers"),
    tenants("{region}.compute.amazonaws.com", "EC2 instance public names"),
    tenants("compute-1.amazonaws.com", "EC2 instance public names"),
    tenants("{region}.es.amazonaws.com", "Amazon OpenSearch Service domains"),
    tenants("iot.{region}.amazonaws.com", "AWS IoT Core account endpoints"),
    tenants("appsync-api.{region}.amazonaws.com", "AWS AppSync APIs"),
    tenants("{any}.{region}.rds.amazonaws.com", "Amazon RDS databases"),
    parent("amazonaws.com.cn", "Amazon Web Services China"),
    tenants("s3.{region}.amazonaws.com.cn", "Amazon S3 buckets"),
    tenants("execute-api.{region}.amazonaws.com.cn", "Amazon API Gateway APIs"),
    tenants("dkr.ecr.{region}.amazonaws.com.cn", "Amazon ECR registries"),
    tenants("{region}.elb.amazonaws.com.cn", "Elastic Load Balancing load balancers"),
    parent("on.aws", "Amazon Web Services"),
    tenants("lambda-url.{region}.on.aws", "AWS Lambda function URLs"),
    tenants("cloudfront.net", "Amazon CloudFront distributions"),
    tenants("cloudfront.cn", "Amazon CloudFront distributions"),
    tenants("awsglobalaccelerator.com", "AWS Global Accelerator accelerators"),
    tenants("{region}.awsapprunner.com", "AWS App Runner services"),
    tenants("amplifyapp.com", "AWS Amplify apps"),
    tenants("elasticbeanstalk.com", "AWS Elastic Beanstalk environments"),
    tenants("{region}.elasticbeanstalk.com", "AWS Elastic Beanstalk environments"),
    // ----- Microsoft Azure -----
    parent("windows.net", "Microsoft Azure"),
    parent("core.windows.net", "Azure Storage"),
    tenants("blob.core.windows.net", "Azure Storage accounts"),
    tenants("file.core.windows.net", "Azure Storage accounts"),
    tenants("queue.core.windows.net", "Azure Storage accounts"),
    tenants("table.core.windows.net", "Azure Storage accounts"),
    tenants("dfs.core.windows.net", "Azure Storage accounts"),
    tenants("{any}.web.core.windows.net", "Azure Storage static websites"),
    tenants("database.windows.net", "Azure SQL servers"),
    tenants("servicebus.windows.net", "Azure Service Bus and Event Hubs namespaces"),
    tenants("redis.cache.windows.net", "Azure Cache for Redis instances"),
    tenants("search.windows.net", "Azure AI Search services"),
    parent("azure.net", "Microsoft Azure"),
    tenants("vault.azure.net", "Azure Key Vaults"),
    tenants("{any}.blob.storage.azure.net", "Azure Storage accounts"),
    parent("azure.com", "Microsoft Azure"),
    tenants("{any}.cloudapp.azure.com", "Azure virtual machine DNS labels"),
    tenants("documents.azure.com", "Azure Cosmos DB accounts"),
    tenants("openai.azure.com", "Azure OpenAI resources"),
    tenants("cognitiveservices.azure.com", "Azure AI services resources"),
    tenants("azurewebsites.net", "Azure App Service apps"),
    tenants("cloudapp.net", "Azure cloud services"),
    tenants("azurecr.io", "Azure Container Registry registries"),
    tenants("azureedge.net", "Azure CDN endpoints"),
    tenants("azurefd.net", "Azure Front Door endpoints"),
    tenants("azure-api.net", "Azure API Management services"),
    tenants("azurestaticapps.net", "Azure Static Web Apps"),
    tenants("trafficmanager.net", "Azure Traffic Manager profiles"),
    tenants("azure-devices.net", "Azure IoT Hubs"),
    tenants("azuredatabricks.net", "Azure Databricks workspaces"),
    tenants("{any}.devtunnels.ms", "Microsoft dev tunnels"),
    // ----- Google -----
    parent("googleapis.com", "Google APIs"),
    tenants("storage.googleapis.com", "Google Cloud Storage buckets"),
    tenants("googleusercontent.com", "Google user content"),
    tenants("appspot.com", "Google App Engine apps"),
    tenants("run.app", "Google Cloud Run services"),
    tenants("cloudfunctions.net", "Google Cloud Functions"),
    tenants("cloud.goog", "Google Cloud project endpoints"),
    tenants("firebaseapp.com", "Firebase Hosting sites"),
    tenants("web.app", "Firebase Hosting sites"),
    tenants("firebaseio.com", "Firebase Realtime Database instances"),
    tenants("firebasestorage.app", "Firebase Storage buckets"),
    // ----- Other clouds and object stores -----
    parent("aliyuncs.com", "Alibaba Cloud (OSS buckets, function endpoints)"),
    parent("myqcloud.com", "Tencent Cloud (COS buckets)"),
    parent("appdomain.cloud", "IBM Cloud (apps, object storage)"),
    tenants("{any}.digitaloceanspaces.com", "DigitalOcean Spaces buckets"),
    tenants("ondigitalocean.app", "DigitalOcean App Platform apps"),
    tenants("{any}.linodeobjects.com", "Akamai (Linode) Object Storage buckets"),
    parent("backblazeb2.com", "Backblaze B2"),
    tenants("s3.{region}.backblazeb2.com", "Backblaze B2 buckets"),
    parent("wasabisys.com", "Wasabi"),
    tenants("s3.{region}.wasabisys.com", "Wasabi buckets"),
    tenants("r2.cloudflarestorage.com", "Cloudflare R2 accounts"),
    tenants("r2.dev", "Cloudflare R2 public buckets"),
    // ----- Code hosting and app platforms -----
    tenants("github.io", "GitHub Pages sites"),
    tenants("githubusercontent.com", "GitHub user content"),
    tenants("app.github.dev", "GitHub Codespaces forwarded ports"),
    tenants("gitlab.io", "GitLab Pages sites"),
    tenants("bitbucket.io", "Bitbucket Cloud sites"),
    tenants("herokuapp.com", "Heroku apps"),
    tenants("herokudns.com", "Heroku custom-domain targets"),
    tenants("vercel.app", "Vercel deployments"),
    tenants("now.sh", "Vercel deployments"),
    tenants("netlify.app", "Netlify sites"),
    tenants("netlify.com", "Netlify sites"),
    tenants("pages.dev", "Cloudflare Pages sites"),
    tenants("workers.dev", "Cloudflare Workers"),
    tenants("trycloudflare.com", "Cloudflare quick tunnels"),
    tenants("fly.dev", "Fly.io apps"),
    tenants("onrender.com", "Render services"),
    tenants("up.railway.app", "Railway services"),
    tenants("deno.dev", "Deno Deploy projects"),
    tenants("repl.co", "Replit apps"),
    tenants("replit.app", "Replit apps"),
    tenants("replit.dev", "Replit apps"),
    tenants("glitch.me", "Glitch apps"),
    tenants("surge.sh", "Surge sites"),
    tenants("supabase.co", "Supabase projects"),
    tenants("blogspot.com", "Blogger blogs"),
    tenants("wordpress.com", "WordPress.com sites"),
    tenants("pythonanywhere.com", "PythonAnywhere apps"),
    // ----- Tunnels and request catchers -----
    tenants("ngrok.io", "ngrok tunnels"),
    tenants("ngrok.app", "ngrok tunnels"),
    tenants("ngrok.dev", "ngrok tunnels"),
    tenants("ngrok-free.app", "ngrok tunnels"),
    tenants("ngrok-free.dev", "ngrok tunnels"),
    tenants("loca.lt", "localtunnel tunnels"),
    tenants("serveo.net", "Serveo tunnels"),
    tenants("lhr.life", "localhost.run tunnels"),
    tenants("ts.net", "Tailscale tailnets (Funnel)"),
    tenants("m.pipedream.net", "Pipedream request bins"),
    tenants("beeceptor.com", "Beeceptor endpoints"),
    tenants("requestcatcher.com", "Request Catcher endpoints"),
    // ----- Out-of-band testing servers (every name is an attacker's catch-all) -----
    tenants("oast.pro", "interactsh out-of-band servers"),
    tenants("oast.live", "interactsh out-of-band servers"),
    tenants("oast.site", "interactsh out-of-band servers"),
    tenants("oast.online", "interactsh out-of-band servers"),
    tenants("oast.fun", "interactsh out-of-band servers"),
    tenants("oast.me", "interactsh out-of-band servers"),
    tenants("interact.sh", "interactsh out-of-band servers"),
    tenants("oastify.com", "Burp Collaborator servers"),
    tenants("burpcollaborator.net", "Burp Collaborator servers"),
    tenants("dnslog.cn", "DNSLog out-of-band servers"),
    tenants("ceye.io", "CEYE out-of-band servers"),
];

/// A cloud region label: two letters, one or two alphabetic words, a 1–3 digit number
/// (`us-east-1`, `ap-southeast-2`, `us-gov-west-1`, `cn-northwest-1`, `us-west-004`).
fn is_region(label: &str) -> bool {
    let parts: Vec<&str> = label.split('-').collect();
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return false;
    };
    let middle = parts.get(1..parts.len().saturating_sub(1)).unwrap_or(&[]);
    first.len() == 2
        && first.bytes().all(|b| b.is_ascii_lowercase())
        && (1..=3).contains(&last.len())
        && last.bytes().all(|b| b.is_ascii_digit())
        && (1..=2).contains(&middle.len())
        && middle.iter().all(|w| (2..=10).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase()))
}

fn label_matches(pattern: &str, label: &str) -> bool {
    match pattern {
        "{any}" => !label.is_empty(),
        "{region}" => is_region(label),
        lit => lit == label,
    }
}

/// If `domain` equals an instance of a curated pattern, or is a proper ancestor of one:
/// the entry and the instance (labels filled from `domain` where it reaches, shown as
/// `<region>`/`<name>` beyond). A proper descendant (a tenant's own name) matches nothing.
fn curated(domain: &str) -> Option<(&'static Shared, String)> {
    let labels: Vec<&str> = domain.rsplit('.').collect();
    // Rank: an exact match first, then a tenant namespace (more concrete), then table order.
    let mut best: Option<((bool, bool), &'static Shared, String)> = None;
    for entry in SHARED {
        let pat: Vec<&str> = entry.pattern.rsplit('.').collect();
        if labels.len() > pat.len() || !labels.iter().zip(&pat).all(|(l, p)| label_matches(p, l)) {
            continue;
        }
        let rank = (labels.len() == pat.len(), entry.kind == Kind::Tenants);
        if best.as_ref().is_some_and(|(r, _, _)| *r >= rank) {
            continue;
        }
        let mut instance = pat;
        for (slot, l) in instance.iter_mut().zip(&labels) {
            *slot = l;
        }
        instance.reverse();
        let shown = instance.join(".").replace("{region}", "<region>").replace("{any}", "<name>");
        best = Some((rank, entry, shown));
    }
    best.map(|(_, entry, instance)| (entry, instance))
}

/// Why a wildcard `*.domain` / `.domain` is an exfiltration path, or `None`.
///
/// A wildcard is an exfiltration path when someone other than the policy's author can
/// obtain a name it matches: a client inside the VPC then sends data to an endpoint the
/// attacker registered or hosts, and the proxy lets it through because the name matches.
/// `domain` is lowercased, and a trailing `.` and leading `*.`/`.` are stripped. The
/// rules, first hit wins:
///
/// 1. `""` (a bare `*`): `"matches every name"`.
/// 2. `domain` is a public suffix listed by the PSL (ICANN, e.g. `com`, `co.uk`; or
///    PRIVATE, a shared-tenant domain such as `github.io`, `cloudfront.net`,
///    `s3.amazonaws.com`, `blob.core.windows.net`); the message names the section.
/// 3. Every child of `domain` is a public suffix (a PSL `*.domain` rule, e.g.
///    `elb.amazonaws.com`): detected with a probe child `egressd-probe-0.<domain>`.
/// 4. `domain` equals, or is an ancestor of, a namespace of the curated table of cloud,
///    hosting, tunnelling and out-of-band-testing providers (`amazonaws.com`,
///    `s3.{region}.amazonaws.com`, `dkr.ecr.{region}.amazonaws.com`, `windows.net`,
///    `database.windows.net`, `storage.googleapis.com`, `ngrok.io`, …). The PSL cannot
///    enumerate its rules, so ancestors of shared namespaces are only found this way or
///    by rule 5. A proper *descendant* of a namespace (`my-org-bucket.s3.amazonaws.com`,
///    `myapp.github.io`) is one tenant's name and is not flagged.
/// 5. A child `x.<domain>` for `x` among common region and service labels is a listed
///    public suffix or has a `*` rule under it (e.g. `dualstack.us-east-1.amazonaws.com`
///    holds `s3.dualstack.us-east-1.amazonaws.com`).
/// 6. `domain` is a single label the PSL does not list: by the list's default rule it is
///    a public suffix (a TLD newer than the compiled list, or a typo). Reserved TLDs that
///    can never be delegated publicly (`internal`, `local`, `localhost`, `test`,
///    `invalid`, `example`, `alt`) are exempt.
///
/// Not flagged: registrable names under ordinary suffixes (`example.org`,
/// `corp.example.com`) and tenant-owned names. Names under a provider domain that neither
/// the PSL nor the table marks as shared (`sts.amazonaws.com`) are not flagged either.
pub fn wildcard_risk(domain: &str) -> Option<String> {
    let mut d = domain.to_ascii_lowercase();
    if d.ends_with('.') {
        d.pop();
    }
    let mut start = 0;
    loop {
        let rest = d.get(start..).unwrap_or("");
        if rest.starts_with("*.") {
            start += 2;
        } else if rest.starts_with('.') {
            start += 1;
        } else {
            break;
        }
    }
    if rest_is_star(d.get(start..).unwrap_or("")) {
        return Some("matches every name".to_owned());
    }
    let d = d.get(start..).unwrap_or("");

    let consequence = |what: &str| {
        format!(
            "{what}, so an attacker can host an endpoint that matches `*.{d}` and a client \
             can send data to it through the proxy"
        )
    };

    // 2. The domain itself is a listed public suffix.
    if let Some(typ) = listed(d) {
        let who = match typ {
            Type::Icann => "anyone can register a name under it",
            Type::Private => "anyone can get or host a name under it",
        };
        return Some(consequence(&format!("`{d}` is a public suffix ({}): {who}", section(typ))));
    }

    // 3. Every child is a public suffix (a `*.domain` rule).
    if let Some(typ) = listed(&format!("{PROBE}.{d}")) {
        return Some(consequence(&format!(
            "every name directly under `{d}` is a public suffix (rule `*.{d}`, {}): anyone \
             can get a name below it",
            section(typ)
        )));
    }

    // 4. The curated table.
    if let Some((entry, instance)) = curated(d) {
        let what = entry.what;
        let text = match (entry.kind, instance == d) {
            (Kind::Tenants, true) => format!(
                "`{d}` is a shared-tenant namespace ({what}): every name under it is some \
                 customer's, and anyone can become a customer"
            ),
            (Kind::Parent, true) => format!(
                "`{d}` holds shared-tenant namespaces ({what}: buckets, apps and endpoints \
                 of every customer): anyone can become a customer and get a name under it"
            ),
            (Kind::Tenants, false) => format!(
                "`*.{d}` covers the shared-tenant namespace `{instance}` ({what}): every \
                 name there is some customer's, and anyone can become a customer"
            ),
            (Kind::Parent, false) => format!(
                "`*.{d}` covers `{instance}`, which holds shared-tenant namespaces ({what}): \
                 anyone can become a customer and get a name under it"
            ),
        };
        return Some(consequence(&text));
    }

    // 5. A public suffix found below the domain.
    for child in CHILD_PROBES {
        let name = format!("{child}.{d}");
        let found = listed(&name)
            .map(|t| (name.clone(), t))
            .or_else(|| listed(&format!("{PROBE}.{name}")).map(|t| (format!("*.{name}"), t)));
        if let Some((suffix, typ)) = found {
            return Some(consequence(&format!(
                "`*.{d}` covers the public suffix `{suffix}` ({}): anyone can get a name \
                 under it",
                section(typ)
            )));
        }
    }

    // 6. An unlisted top-level domain.
    if !d.contains('.') && !RESERVED_TLDS.contains(&d) {
        return Some(consequence(&format!(
            "`{d}` is a top-level domain the compiled Public Suffix List does not list; by \
             the list's default rule it is a public suffix, where anyone may be able to \
             register a name"
        )));
    }
    None
}

/// True for the empty domain (the wildcard `*` alone).
fn rest_is_star(rest: &str) -> bool {
    rest.is_empty() || rest == "*"
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn registrable_domains() {
        assert_eq!(registrable_domain("www.example.co.uk"), "example.co.uk");
        assert_eq!(registrable_domain("a.b.github.io"), "b.github.io");
        assert_eq!(registrable_domain("x.y.unknowntld-zz"), "y.unknowntld-zz");
        assert_eq!(registrable_domain("com"), "com");
        assert_eq!(registrable_domain("co.uk"), "co.uk");
        assert_eq!(registrable_domain("github.io"), "github.io");
        assert_eq!(registrable_domain("localhost"), "localhost");
        assert_eq!(registrable_domain("example.com"), "example.com");
        assert_eq!(registrable_domain("a.b.c.example.com"), "example.com");
        assert_eq!(registrable_domain("www.example.com."), "example.com");
        assert_eq!(registrable_domain("my-bucket.s3.amazonaws.com"), "my-bucket.s3.amazonaws.com");
        assert_eq!(registrable_domain("x.my-bucket.s3.amazonaws.com"), "my-bucket.s3.amazonaws.com");
        assert_eq!(registrable_domain("sts.amazonaws.com"), "amazonaws.com");
        assert_eq!(registrable_domain("www.xn--85x722f.xn--55qx5d.cn"), "xn--85x722f.xn--55qx5d.cn");
        assert_eq!(registrable_domain(""), "");
        assert_eq!(registrable_domain("."), "");
    }

    #[test]
    fn public_suffixes() {
        for s in ["com", "co.uk", "github.io", "s3.amazonaws.com", "blob.core.windows.net"] {
            assert!(is_public_suffix(s), "{s}");
        }
        for s in ["", "example.com", "amazonaws.com", "unknowntld-zz", "myapp.github.io"] {
            assert!(!is_public_suffix(s), "{s}");
        }
        assert!(is_public_suffix("com."));
    }

    const RISKY: &[&str] = &[
        "",
        "*",
        "com",
        "co.uk",
        "uk",
        "github.io",
        "cloudfront.net",
        "amazonaws.com",
        "amazonaws.com.cn",
        "s3.amazonaws.com",
        "us-east-1.amazonaws.com",
        "s3.us-east-1.amazonaws.com",
        "execute-api.us-east-1.amazonaws.com",
        "dkr.ecr.us-east-1.amazonaws.com",
        "ecr.us-east-1.amazonaws.com",
        "elb.amazonaws.com",
        "us-east-1.elb.amazonaws.com",
        "dualstack.us-east-1.amazonaws.com",
        "airflow.amazonaws.com",
        "blob.core.windows.net",
        "core.windows.net",
        "windows.net",
        "database.windows.net",
        "vault.azure.net",
        "azure.com",
        "cloudapp.azure.com",
        "eastus.cloudapp.azure.com",
        "storage.googleapis.com",
        "googleapis.com",
        "herokuapp.com",
        "ngrok.io",
        "oast.pro",
        "on.aws",
        "kawasaki.jp",
        "unknowntld-zz",
    ];

    const SAFE: &[&str] = &[
        "example.org",
        "corp.example.com",
        "example.com",
        "my-bucket.s3.amazonaws.com",
        "my-org-bucket.s3.amazonaws.com",
        "my-org-bucket.s3.us-east-1.amazonaws.com",
        "myapp.github.io",
        "d111111abcdef8.cloudfront.net",
        "myaccount.blob.core.windows.net",
        "123456789012.dkr.ecr.us-east-1.amazonaws.com",
        "sts.amazonaws.com",
        "myvm.eastus.cloudapp.azure.com",
        "my-bucket.storage.googleapis.com",
        "internal",
        "ec2.internal",
        "svc.cluster.local",
        "city.kawasaki.jp",
    ];

    #[test]
    fn wildcard_risk_positives() {
        for d in RISKY {
            let r = wildcard_risk(d);
            assert!(r.is_some(), "{d:?} should be flagged");
        }
        assert_eq!(wildcard_risk("").as_deref(), Some("matches every name"));
        assert_eq!(wildcard_risk("*.").as_deref(), Some("matches every name"));
    }

    #[test]
    fn wildcard_risk_negatives() {
        for d in SAFE {
            assert_eq!(wildcard_risk(d), None, "{d:?} should not be flagged");
        }
    }

    #[test]
    fn wildcard_risk_messages() {
        let com = wildcard_risk("com").unwrap_or_default();
        assert!(com.contains("ICANN section"), "{com}");
        assert!(com.contains("anyone can register"), "{com}");
        assert!(com.contains("`*.com`"), "{com}");
        let gh = wildcard_risk("github.io").unwrap_or_default();
        assert!(gh.contains("PRIVATE section"), "{gh}");
        assert!(gh.contains("attacker"), "{gh}");
        let aws = wildcard_risk("amazonaws.com").unwrap_or_default();
        assert!(aws.contains("shared-tenant"), "{aws}");
        let region = wildcard_risk("ecr.us-east-1.amazonaws.com").unwrap_or_default();
        assert!(region.contains("dkr.ecr.us-east-1.amazonaws.com"), "{region}");
        assert!(region.contains("ECR"), "{region}");
        let elb = wildcard_risk("elb.amazonaws.com").unwrap_or_default();
        assert!(elb.contains("every name directly under"), "{elb}");
        let dual = wildcard_risk("dualstack.us-east-1.amazonaws.com").unwrap_or_default();
        assert!(dual.contains("s3"), "{dual}");
        let tld = wildcard_risk("unknowntld-zz").unwrap_or_default();
        assert!(tld.contains("does not list"), "{tld}");
    }

    #[test]
    fn wildcard_risk_normalises() {
        assert!(wildcard_risk("*.com").is_some());
        assert!(wildcard_risk(".com").is_some());
        assert!(wildcard_risk("COM").is_some());
        assert!(wildcard_risk("GitHub.IO.").is_some());
        assert!(wildcard_risk("*.*.github.io").is_some());
        assert_eq!(wildcard_risk("*.example.org"), None);
    }

    #[test]
    fn region_labels() {
        for l in ["us-east-1", "ap-southeast-2", "us-gov-west-1", "cn-northwest-1", "us-west-004"] {
            assert!(is_region(l), "{l}");
        }
        for l in ["", "-", "us", "east-1", "us-east", "sts", "u-east-1", "us-east-1a", "us-1", "my-org-bucket"] {
            assert!(!is_region(l), "{l}");
        }
    }

    /// Fills a pattern's tokens with sample labels.
    fn instance(pattern: &str) -> String {
        pattern.replace("{region}", "us-east-1").replace("{any}", "zone1")
    }

    #[test]
    fn curated_table_is_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for e in SHARED {
            assert!(seen.insert(e.pattern), "duplicate {}", e.pattern);
            let labels: Vec<&str> = e.pattern.split('.').collect();
            assert!(labels.len() >= 2, "{}", e.pattern);
            for (i, l) in labels.iter().enumerate() {
                assert!(!l.is_empty(), "{}", e.pattern);
                assert!(*l != "{any}" || i == 0, "{{any}} not leftmost in {}", e.pattern);
                assert!(
                    l.starts_with('{') || l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                    "{}",
                    e.pattern
                );
            }
            let inst = instance(e.pattern);
            assert!(wildcard_risk(&inst).is_some(), "{inst}");
            // Every ancestor with two or more labels is flagged too.
            let mut rest = inst.as_str();
            while let Some((_, tail)) = rest.split_once('.') {
                if tail.contains('.') {
                    assert!(wildcard_risk(tail).is_some(), "{tail} (ancestor of {inst})");
                }
                rest = tail;
            }
            // A tenant's name under it is not flagged by the table.
            if e.kind == Kind::Tenants {
                assert!(curated(&format!("tenant-x.{inst}")).is_none(), "{inst}");
            }
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "[a-z0-9.*_-]{0,40}|\\PC{0,20}") {
            let r = registrable_domain(&s);
            prop_assert!(s.strip_suffix('.').unwrap_or(&s).ends_with(r));
            let _ = is_public_suffix(&s);
            let _ = wildcard_risk(&s);
        }

        #[test]
        fn suffixes_are_flagged(s in "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}") {
            if is_public_suffix(&s) {
                prop_assert!(wildcard_risk(&s).is_some());
            }
        }
    }
}
