variable "name" {
  description = "Name prefix of every resource, and the value of the egressd-fleet tag Prometheus discovers instances by."
  type        = string
  default     = "egressd"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}$", var.name))
    error_message = "name: 2-21 characters, lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}

# --- network ------------------------------------------------------------------------------------

variable "egress_vpc_cidr" {
  description = "CIDR of the egress VPC the module creates. Must not overlap the browser VPC (they are peered). A /22 holds three AZs: a /26 for the appliances and a /28 for the NAT gateway in each."
  type        = string
  default     = "10.64.0.0/22"
}

variable "availability_zones" {
  description = "Availability zones (names, 2 or 3) to spread the fleet, the load balancer and the NAT gateways over. Listed explicitly so that a zone AWS adds later never reshapes the network."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2 && length(var.availability_zones) <= 3
    error_message = "availability_zones must name 2 or 3 zones."
  }
}

variable "browser_vpc_id" {
  description = "The VPC of the clients (for example a managed secure browser's VPC). It is peered with the egress VPC and its DHCP options point DNS at egressd."
  type        = string
}

variable "browser_route_table_ids" {
  description = "Route tables of the browser subnets. The module adds a route to the egress VPC; they must hold no default route (0.0.0.0/0 or ::/0), so egressd is the only way out."
  type        = list(string)
}

variable "client_cidrs" {
  description = "Client ranges admitted to the proxy and DNS ports (the browser subnets). Empty: the whole browser VPC."
  type        = list(string)
  default     = []
}

variable "browser_domain_name" {
  description = "Search domain handed to the browser VPC by its DHCP options (for example ec2.internal in us-east-1). Empty: none."
  type        = string
  default     = ""
}

variable "scraper_cidrs" {
  description = "Addresses of the Prometheus servers that scrape the admin port (9180) directly."
  type        = list(string)
}

variable "nlb_host_number" {
  description = "Host number of the load balancer's fixed private address in each appliance subnet; these addresses are the browser VPC's DNS servers."
  type        = number
  default     = 10
}

variable "allowed_egress_ports" {
  description = "TCP ports egressd may connect to on the Internet: the union of the ports your rules allow."
  type        = list(number)
  default     = [80, 443]
}

variable "guard_allow_cidrs" {
  description = "guard.allow_cidrs: private ranges egressd may connect to despite the guard (for example interface VPC endpoint subnets)."
  type        = list(string)
  default     = []
}

# --- instances ----------------------------------------------------------------------------------

variable "instance_type" {
  description = "Instance type of the appliances. See deploy/README.md, 'Sizing'."
  type        = string
  default     = "c7g.large"
}

variable "architecture" {
  description = "CPU architecture of instance_type and of the egressd binary: arm64 (Graviton) or x86_64."
  type        = string
  default     = "arm64"

  validation {
    condition     = contains(["arm64", "x86_64"], var.architecture)
    error_message = "architecture must be arm64 or x86_64."
  }
}

variable "min_size" {
  description = "Fewest instances: at least 2, so that one instance failure leaves capacity."
  type        = number
  default     = 2
}

variable "desired_capacity" {
  description = "Instances at apply time; target tracking on CPU moves it between min_size and max_size."
  type        = number
  default     = 2
}

variable "max_size" {
  description = "Most instances."
  type        = number
  default     = 6
}

variable "cpu_target_percent" {
  description = "Average CPU the Auto Scaling group's target tracking policy keeps."
  type        = number
  default     = 50
}

variable "max_connections" {
  description = "proxy.max_connections per instance: about twice the planned connections per instance (deploy/README.md, 'Sizing'; 10000 suits the default c7g.large). Keep egressd:proxy_max_connections in deploy/prometheus/alerts.yml equal."
  type        = number
  default     = 10000
}

variable "root_volume_gib" {
  description = "Root volume size (the audit log goes to the journal)."
  type        = number
  default     = 16
}

variable "egressd_artifact_bucket" {
  description = "S3 bucket holding the egressd release binary."
  type        = string
}

variable "egressd_artifact_key" {
  description = "Key of the egressd binary for var.architecture in egressd_artifact_bucket."
  type        = string
}

variable "egressd_sha256" {
  description = "SHA-256 of the binary; the instance refuses any other file."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.egressd_sha256))
    error_message = "egressd_sha256 must be 64 lowercase hex digits."
  }
}

variable "rules_bucket" {
  description = "S3 bucket holding the rule files, synced by egressd-rules-sync every 5 minutes."
  type        = string
}

variable "rules_prefix" {
  description = "Prefix of the rule set in rules_bucket, ending in a slash (for example prod/)."
  type        = string
  default     = "prod/"
}

variable "dns_upstream" {
  description = "dns.upstreams of egressd as ip:port. Empty: the egress VPC's Amazon-provided resolver (its base address + 2)."
  type        = string
  default     = ""
}

# --- the IAM layer ------------------------------------------------------------------------------

variable "organization_id" {
  description = "AWS Organizations ID (o-...). The S3 gateway endpoint admits only requests to this organization's resources."
  type        = string

  validation {
    condition     = can(regex("^o-[a-z0-9]{10,32}$", var.organization_id))
    error_message = "organization_id must look like o-abcdefghij."
  }
}

variable "deletion_protection" {
  description = "Deletion protection of the load balancer."
  type        = bool
  default     = true
}

variable "flow_log_retention_days" {
  description = "Retention of the egress VPC's flow logs (CloudWatch Logs)."
  type        = number
  default     = 365
}

variable "trusted_resource_accounts" {
  description = "Accounts outside the organization whose S3 buckets the endpoint still admits (aws:ResourceAccount), for example a supplier's. Empty: none."
  type        = list(string)
  default     = []
}

variable "aws_owned_read_arns" {
  description = "More AWS-owned S3 object ARNs the endpoint admits for s3:GetObject (for example an OS package repository bucket, if instances install packages at boot)."
  type        = list(string)
  default     = []
}

variable "protected_bucket_names" {
  description = "The organization's buckets to lock to the egress path; the module outputs a bucket policy for each (apply it in the bucket's account)."
  type        = list(string)
  default     = []
}
